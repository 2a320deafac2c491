"""Collect the per-batch results: summary.json, objects.parquet, fields/wells/plate.csv, metrics.csv and
provenance.json. Memory is bounded by one row group of a batch table (steps/measure writes them in groups of
``ROW_GROUP`` objects) plus the areas of all objects (8 bytes each, for exact medians; plate and well as
categories), so a single image of millions of objects is aggregated in about the memory of a small plate."""
from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from pandas.api.types import union_categoricals

from ..io.ome_zarr import read_json, write_atomic, write_json_atomic
from ..measure.summaries import fields_table, metrics_table, plate_table, public, wells_table
from ..provenance import provenance
from .plan import release_labels


def concat_parquet(paths: list[str], out: str) -> int:
    """Stream the batch tables into one Parquet file (one batch in memory at a time); returns the row count."""
    tables = [p for p in paths if pq.ParquetFile(p).metadata.num_rows]
    n = 0

    def write(tmp):
        nonlocal n
        if not tables:  # no objects anywhere: an empty table with the key columns
            pd.DataFrame(columns=["plate", "well", "row", "column", "field", "label"]).to_parquet(tmp, index=False)
            return
        schema = pq.read_schema(tables[0])
        with pq.ParquetWriter(tmp, schema) as w:
            for p in tables:
                f = pq.ParquetFile(p)
                for g in range(f.num_row_groups):  # one row group at a time
                    t = f.read_row_group(g).select(schema.names).cast(schema)
                    w.write_table(t)
                    n += t.num_rows
    write_atomic(out, write)
    return n


def object_areas(paths: list[str]) -> pd.DataFrame:
    """(plate, well, area) of every object; plate and well as categoricals (a code per object, not a string)."""
    parts = [pq.read_table(p, columns=["plate", "well", "area"], read_dictionary=["plate", "well"]).to_pandas()
             for p in paths if pq.ParquetFile(p).metadata.num_rows]
    if not parts:
        return pd.DataFrame(columns=["plate", "well", "area"])
    cols = {k: union_categoricals([q[k].astype("category") for q in parts]) for k in ("plate", "well")}
    area = np.concatenate([q["area"].to_numpy() for q in parts])
    return pd.DataFrame({**cols, "area": area})


def aggregate(cfg: dict[str, Any], plan: dict[str, Any], model_info: dict[str, Any], batch_jsons: list[str],
              batch_tables: list[str], out_dir: str, configfiles: list[str] | None = None) -> dict[str, Any]:
    """Write every plate-level output into ``out_dir``; returns the summary."""
    status: dict[str, Any] = {}
    for p in batch_jsons:
        status.update(read_json(p)["fields"])
    n_objects = concat_parquet(batch_tables, os.path.join(out_dir, "objects.parquet"))
    fields = fields_table(plan["fields"], status)
    areas = object_areas(batch_tables)
    wells = wells_table(fields, areas, cfg["report"]["outlier_mad"])
    plate = plate_table(fields, wells, areas)
    csv = (lambda df, name: write_atomic(os.path.join(out_dir, name), lambda p: df.to_csv(p, index=False)))
    csv(public(fields), "fields.csv")
    csv(wells, "wells.csv")
    csv(plate, "plate.csv")
    if cfg.get("ground_truth"):
        csv(metrics_table(fields), "metrics.csv")
    write_json_atomic(os.path.join(out_dir, "provenance.json"), provenance(cfg, model_info, configfiles))
    summary_fields = []
    for f in plan["fields"]:
        s = status.get(f["key"], {"status": "missing", "n_objects": 0})
        summary_fields.append({k: f[k] for k in ("plate", "well", "row", "column", "field", "path", "image",
                                                 "predictions", "labels")}
                              | {"n_objects": s.get("n_objects", 0), "status": s["status"]}
                              | ({"error": s["error"]} if s.get("error") else {})
                              | ({"scores": s["scores"]} if s.get("scores") else {}))
    counts = pd.Series([f["status"] for f in summary_fields]).value_counts().to_dict()
    summary = {"input": plan["input"], "kind": plan["kind"], "method": cfg["method"], "model": model_info,
               "n_fields": len(summary_fields), "status_counts": counts, "n_objects": n_objects,
               "labels_name": cfg["labels"]["name"], "plate_rows": _plate_axis(plan, "row"),
               "plate_columns": _plate_axis(plan, "column"), "config": cfg, "fields": summary_fields}
    write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
    return summary


class FailedFieldsError(RuntimeError):
    """Some fields failed: the run's outputs are written, and the next run redoes their batches."""


def check_complete(cfg: dict[str, Any], plan: dict[str, Any], out_dir: str, out_json: str) -> dict[str, Any]:
    """The last step of a plate run: fine when every field is ok or empty. Otherwise (with
    ``batching.rerun_failed``) retire the failed batches and fail the run, naming the fields."""
    summary = read_json(os.path.join(out_dir, "summary.json"))
    bad = [f for f in summary["fields"] if f["status"] not in ("ok", "empty")]
    if bad and cfg["batching"]["rerun_failed"]:
        retired = retire_failed_batches(out_dir, plan, {f["path"] for f in bad})
        lines = [f"  {f['path'] or 'image'}: {f['status']}: {f.get('error', 'no result')}" for f in bad[:20]]
        raise FailedFieldsError(
            f"{len(bad)} of {len(summary['fields'])} fields failed (summary.json, fields.csv and report.html list them):\n"
            + "\n".join(lines) + ("\n  ..." if len(bad) > 20 else "")
            + f"\nRun the same command again to redo just their batches ({', '.join(retired)}); fix the inputs "
            "first if the error is in the data, or set batching.rerun_failed: false to accept the failures.")
    result = {"n_fields": len(summary["fields"]), "failed": [f["path"] for f in bad]}
    write_json_atomic(out_json, result)
    release_labels(cfg, plan)  # the run is complete: another run may write these label images now
    return result


def retire_failed_batches(out_dir: str, plan: dict[str, Any], failed_paths: set[str]) -> list[str]:
    """Rename the job markers of batches holding a failed or missing field to ``*.failed``: the next run
    sees them missing and recomputes just those batches (the outputs of this run stay readable meanwhile).
    A marker adopted from a shared job (``embeddings.from_job``: several methods from one encoder pass,
    steps/shared_embeddings.py) retires that job too, so that the rerun recomputes the batch."""
    retired = []
    for batch, idx in sorted(plan["batches"].items()):
        if not any(plan["fields"][i]["path"] in failed_paths for i in idx):
            continue
        for kind in ("predict", "segment", "measure"):
            marker = os.path.join(out_dir, "jobs", kind, f"{batch}.json")
            if os.path.exists(marker):
                _retire(read_json(marker).get("embeddings", {}).get("from_job"))
                _retire(marker)
        retired.append(batch)
    return retired


def _retire(path: str | None) -> None:
    if path:
        with contextlib.suppress(FileNotFoundError):  # e.g. another method's check retired that job already
            os.replace(path, path + ".failed")


def _plate_axis(plan: dict[str, Any], key: str) -> list[str]:
    """Row or column names of the plate (from its metadata when the plan has it, else from the fields)."""
    names = plan.get(f"plate_{key}s") or sorted({f[key] for f in plan["fields"]},
                                                key=lambda s: (len(s), s) if key == "row" else int(s or 0))
    return list(names)
