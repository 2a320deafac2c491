"""Ingest steps (when ``ingest.source`` is set): plan + plate metadata, one job per batch of fields, check.

A failed field stops the run at ``finish_ingest`` with the list of failed files: a plate with missing
fields is never segmented silently. The batch records holding failures are moved aside, so the next run
redoes those batches; their converted fields are kept (per-field markers) and only the failed ones are read
again.
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from ..io.ingest import create_plate, ingest_fields, plan_plate
from ..io.ome_zarr import InputError, read_json, write_json_atomic


def write_ingest_plan(cfg: dict[str, Any], out_json: str) -> dict[str, Any]:
    """Scan ``ingest.source``, create the plate at ``input`` (metadata once), split fields into batches."""
    ing = cfg["ingest"]
    if not ing.get("source"):
        raise InputError("ingest.source is not set: nothing to ingest.")
    spec = plan_plate(ing["source"], ing["pattern"], ing["channel_names"], ing["pixel_size"])
    state = create_plate(cfg["input"], spec, chunk=ing["chunk"], levels=ing["levels"])
    n = cfg["batching"]["fields_per_job"]
    fields = spec.fields
    plan = {k: v for k, v in spec.to_dict().items() if k != "fields"}
    plan.update(input=os.path.abspath(cfg["input"]), plate=state, n_fields=len(fields),
                batches={f"b{i // n:04d}": fields[i:i + n] for i in range(0, len(fields), n)})
    write_json_atomic(out_json, plan)
    return plan


def ingest_mem_mb(plan: dict[str, Any]) -> int:
    """Memory for one ingest job: a field in its dtype a few times over, a float copy, and a base."""
    c, y, x = plan["shape"]
    return int(512 + c * y * x * (3 * np.dtype(plan["dtype"]).itemsize + 4) / 2**20)


def run_ingest_batch(cfg: dict[str, Any], plan: dict[str, Any], batch: str, out_json: str) -> dict[str, Any]:
    """Convert the fields of ``batch``; per-field status ok/failed (the error names the file)."""
    fields = plan["batches"][batch]
    t0 = time.time()
    status = ingest_fields(plan["input"], fields, desc=f"ingest {batch}")
    result = {"batch": batch, "seconds": round(time.time() - t0, 3), "fields": status}
    write_json_atomic(out_json, result)
    return result


def finish_ingest(cfg: dict[str, Any], plan: dict[str, Any], batch_jsons: list[str], out_json: str) -> dict[str, Any]:
    """Check that every field of the plan was converted and write ``done.json``.

    Raises InputError listing the failed fields and their files; their batch records are renamed to
    ``<batch>.json.failed`` so that rerunning the workflow redoes just those batches.
    """
    status: dict[str, dict] = {}
    failed_jsons = []
    for path in batch_jsons:
        fields = read_json(path)["fields"]
        status.update(fields)
        if any(s["status"] != "ok" for s in fields.values()):
            failed_jsons.append(path)
    expected = [f["path"] for b in plan["batches"].values() for f in b]
    failed = {p: status.get(p, {"status": "failed", "error": "no batch reported this field"})
              for p in expected if status.get(p, {}).get("status") != "ok"}
    if failed:
        for path in failed_jsons:
            os.replace(path, f"{path}.failed")
        lines = [f"  {p}: {s.get('error')}" for p, s in sorted(failed.items())]
        more = f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else ""
        raise InputError(
            f"ingest: {len(failed)} of {len(expected)} field(s) of '{plan['source']}' could not be converted "
            f"into '{plan['input']}':\n" + "\n".join(lines[:20]) + more + "\nReplace the broken files and run "
            "again: converted fields are kept and only these are redone. To leave them out instead, remove "
            "the files and delete the ingest plan (the plate is then rebuilt).")
    done = {"input": plan["input"], "source": plan["source"], "pattern": plan["pattern"],
            "n_fields": len(expected), "n_files": plan["n_files"], "plate": plan["plate"],
            "reused_fields": sum(1 for p in expected if status[p].get("reused"))}
    write_json_atomic(out_json, done)
    return done
