"""Several SAM methods side by side from one encoder pass per tile: one GPU job per batch of fields.

With ``method: [apg, ais, amg]`` (:func:`methods.shared_embeddings`) the ``shared_embeddings`` rule runs
the prompt pipeline of steps/prompt_segment.py once per batch: each field is read, encoded (with the
decoder maps when a member reads them) and then every member's own instance step runs on the same
embeddings: APG's and AMG's prompt decoding write their labels where their modules expect them (each
member's plan), the maps go into the predictions store of each member that writes one (APG for QC, AIS for
its CPU ``segment`` rule). The job writes one status file with every member's field statuses; each
member's local ``adopt`` rule (:func:`adopt_shared_batch`) turns it into that member's batch marker, so that
measure, aggregate, report and the retirement of failed batches run as for the method alone.

Same results as each method alone: the same tiles, preprocessing, encoder batches within a field, float32
maps into the prompts and float16 maps in the store, and each member's own instance step and writers. (AIS
alone batches the tiles of several fields together; per tile the arithmetic is the same on CPU, which the
tests check; GPU kernels chosen for another batch size may round differently.) Fields larger than
``tiling.field_block`` are not shared: each member's own path (blockwise prompts, AIS's tile stream) runs
on them in this job, the encoder once per member.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from typing import Any, Callable

import numpy as np
import zarr
from tqdm import tqdm

from ..embed.predict import embed_prepared, prepare_field
from ..embed.prompt_decoder import PromptDecoder
from ..engine.overlap import DeviceClock, StageTimes, run_pipeline, timing_line
from ..engine.runner import UNIT_ERRORS, debug, describe, failed, log_failure, run_units
from ..io.ome_zarr import create_predictions_image, read_json, write_json_atomic
from ..methods import Method, get_method, method_config
from .large_field import is_large, segment_large_field
from .model import load_resolved
from .plan import recheck_field
from .predict import field_task, predict_tasks
from .prompt_segment import MAX_FIELDS_IN_FLIGHT, prompt_labels
from .segment import write_field_labels


def batch_entries(plans: dict[str, dict[str, Any]], batch: str) -> list[dict[str, dict[str, Any]]]:
    """Per field of ``batch``: each member's plan entry (the members' plans batch the same fields)."""
    per = {m: [p["fields"][i] for i in p["batches"][batch]] for m, p in plans.items()}
    keys = {tuple(f["key"] for f in fs) for fs in per.values()}
    if len(keys) != 1:
        raise ValueError(f"batch {batch} holds different fields in the plans of {', '.join(plans)} "
                         "(<output>/methods/<method>/plan.json): delete those plans and run again.")
    return [dict(zip(per, fs)) for fs in zip(*per.values())]


def _maps_out(plan: dict[str, Any], f: dict[str, Any], shape: tuple[int, int], tile: int):
    group = zarr.open_group(f["predictions"], mode="a", zarr_format=plan["zarr_format"])
    return create_predictions_image(group, shape, (tile, tile), plan["version"])


def writes_maps(spec: Method, cfg: dict[str, Any]) -> bool:
    """Whether the member's predictions store receives the decoder maps (APG for QC, AIS to segment)."""
    return spec.store == "sam_maps" and spec.needs_decoder(cfg)


def shared_stages(cfgs: dict[str, dict], plans: dict[str, dict], lead: str, model, decoder: PromptDecoder,
                  clock: DeviceClock | None = None) -> list[tuple[str, Callable]]:
    """The per-field stages (read, device, prompts, write) over ``{member: plan entry}`` items; the last
    leaves ``status[member]``. A member's instance step or writer that fails fails that member only."""
    specs = {m: get_method(c) for m, c in cfgs.items()}
    with_maps = any(s.needs_decoder(cfgs[m]) for m, s in specs.items())
    cfg = cfgs[lead]
    tile, halo = cfg["tiling"]["tile"], cfg["tiling"]["halo"]

    def member(st: dict, m: str, fn: Callable) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        except UNIT_ERRORS as e:
            if debug():
                traceback.print_exc()
            st["errors"][m] = describe(e)
            log_failure(m, st["fs"][lead]["key"], st["errors"][m])
        finally:
            st["own"][m] = st["own"].get(m, 0.0) + time.perf_counter() - t0

    def read(item: dict) -> dict:
        t0 = time.perf_counter()
        fs = {m: recheck_field(cfgs[m], plans[m], f) for m, f in item.items()}
        task = field_task(cfg, plans[lead], fs[lead], with_predictions=False)
        return {"fs": fs, "task": task, "tiles": prepare_field(task, tile, halo), "errors": {}, "own": {},
                "shared": time.perf_counter() - t0}

    def device(st: dict) -> dict:
        t0 = time.perf_counter()
        tiles = st.pop("tiles")
        st["blocks"] = [t.block for t in tiles]
        st["emb"], st["maps"] = embed_prepared(model, tiles, cfg["encoder"]["batch_size"],
                                               cfg["encoder"]["precision"], with_maps=with_maps, clock=clock)
        st["shared"] += time.perf_counter() - t0
        return st

    def prompts(st: dict) -> dict:
        emb, shape = st.pop("emb"), tuple(st["task"].image.shape)
        st["labels"] = {m: member(st, m, lambda m=m: prompt_labels(
            cfgs[m], decoder, st["blocks"], emb, st["maps"] if specs[m].store else None, shape, tile, clock))
            for m in cfgs if specs[m].chain == "prompt_segment"}
        return st

    def write_member(st: dict, m: str) -> dict:
        f, shape = st["fs"][m], tuple(st["task"].image.shape)
        if writes_maps(specs[m], cfgs[m]):
            _maps_out(plans[m], f, shape, tile)[...] = st["maps"].astype(np.float16)
        if specs[m].chain != "prompt_segment":
            return {"status": "ok"}
        labels, info = st["labels"][m]
        n = len(write_field_labels(cfgs[m], plans[m], f, labels))
        return {"status": "ok" if n else "empty", "n_objects": n, **info}

    def write(st: dict) -> dict:
        st["status"] = {}
        for m in cfgs:
            s = None if m in st["errors"] else member(st, m, lambda m=m: write_member(st, m))
            if s is None:
                st["status"][m] = failed(st["errors"][m], **({"n_objects": 0} if specs[m].chain ==
                                                             "prompt_segment" else {}))
            else:
                st["status"][m] = {**s, **({"seconds": round(st["shared"] + st["own"][m], 3)} if "n_objects" in s
                                           else {})}
        return st

    return [("read", read), ("device", device), ("prompts", prompts), ("write", write)]


def _large_fields(cfgs: dict[str, dict], plans: dict[str, dict], entries: list[dict], batch: str, model,
                  decoder: PromptDecoder, clock: DeviceClock) -> dict[str, dict[str, Any]]:
    """Each member's own path on the large fields (not shared): ``{member: {key: status}}``."""
    out: dict[str, dict[str, Any]] = {m: {} for m in cfgs}
    for m, c in cfgs.items():
        if not entries:
            break
        spec = get_method(c)
        if spec.chain == "prompt_segment":
            work = (lambda f, c=c, m=m: segment_large_field(c, plans[m], recheck_field(c, plans[m], f), model,
                                                             decoder, clock)[0])
            on_error = (lambda f, err: failed(err, n_objects=0))
        else:
            def work(f, c=c, m=m):
                err, _ = predict_tasks(model, [field_task(c, plans[m], recheck_field(c, plans[m], f))],
                                       c["tiling"]["tile"], c["tiling"]["halo"], c["encoder"]["batch_size"],
                                       c["encoder"]["precision"])
                return failed(err[f["key"]]) if f["key"] in err else {"status": "ok"}
            on_error = None
        out[m] = run_units([(e[m]["key"], e[m]) for e in entries], work,
                           f"{m} {batch} (large fields, not shared)", on_error=on_error)
    return out


def run_shared_batch(cfg: dict[str, Any], shared: dict[str, Any], plans: dict[str, dict[str, Any]], batch: str,
                     model_info: dict[str, Any], out_json: str, overlap: bool = True) -> dict[str, Any]:
    """Every member's labels / maps of ``batch`` from one encoder pass per field; writes ``out_json`` with
    each member's field statuses (``by_method``). ``cfg``: the config of the method list; ``shared``: its
    :func:`methods.shared_embeddings`; ``plans``: each member's plan."""
    lead, methods = shared["lead"], list(shared["methods"])
    cfgs = {m: method_config(cfg, m) for m in [lead] + [m for m in methods if m != lead]}
    with_maps = any(get_method(c).needs_decoder(c) for c in cfgs.values())
    model = load_resolved(model_info, cfg["model"]["device"], require_decoder=with_maps,
                          compile=cfg["encoder"]["compile"])
    decoder = PromptDecoder(model.sam)
    clock, times = DeviceClock(model.device), StageTimes()
    entries = batch_entries({m: plans[m] for m in cfgs}, batch)
    large = [e for e in entries if is_large(cfg, e[lead].get("shape") or (0, 0))]
    status = _large_fields(cfgs, plans, large, batch, model, decoder, clock)
    small = [e for e in entries if not is_large(cfg, e[lead].get("shape") or (0, 0))]
    stages = shared_stages(cfgs, plans, lead, model, decoder, clock)
    bar = tqdm(total=len(small), desc=f"{'+'.join(cfgs)} {batch} ({model.device})", unit="field", file=sys.stderr)
    with bar, contextlib.closing(run_pipeline(small, stages, depth=1, threaded=overlap, times=times,
                                              max_in_flight=MAX_FIELDS_IN_FLIGHT)) as outs:
        for out in outs:
            key = out.item[lead]["key"]
            if isinstance(out.error, UNIT_ERRORS):  # reading or encoding the field: every member fails it
                if debug():
                    traceback.print_exception(out.error)
                for m, c in cfgs.items():
                    status[m][key] = failed(describe(out.error), **({"n_objects": 0} if get_method(c).chain ==
                                                                     "prompt_segment" else {}))
                log_failure(f"{'+'.join(cfgs)} {batch}", key, describe(out.error))
            elif out.error is not None:
                raise out.error
            else:
                for m in cfgs:
                    status[m][key] = out.value["status"][m]
            bar.update(1)
    timing = {**clock.report(times), "overlap": overlap}
    print(timing_line(f"{'+'.join(cfgs)} {batch} (shared embeddings)", timing), file=sys.stderr)
    result = {"batch": batch, "device": str(model.device), "lead": lead, "methods": methods,
              "embeddings": shared.get("embeddings", "sam"), "not_shared": [e[lead]["key"] for e in large],
              "timing": timing, "by_method": {m: {"fields": status[m]} for m in methods}}
    write_json_atomic(out_json, result)
    return result


def adopt_shared_batch(shared_json: str, method: str, out_json: str) -> dict[str, Any]:
    """``method``'s batch marker from the shared job's status file (the local ``<method>_adopt`` rule): its
    field statuses, and under ``embeddings`` the job its embeddings came from (``retire_failed_batches``
    retires that job too, so that a rerun recomputes the batch)."""
    job = read_json(shared_json)
    emb = {"from_job": os.path.abspath(shared_json), "lead": job["lead"], "shared_by": job["methods"],
           "not_shared": job["not_shared"]}
    result = {"batch": job["batch"], "device": job["device"], "method": method,
              "timing": {**job["timing"], "embeddings_from": f"{job['lead']} (shared job {shared_json})"},
              "embeddings": emb, "fields": job["by_method"][method]["fields"]}
    write_json_atomic(out_json, result)
    print(f"{method} {job['batch']}: embeddings from {job['lead']}'s shared job {shared_json} (shared by "
          f"{', '.join(job['methods'])}; not shared: {', '.join(job['not_shared']) or 'none'})", file=sys.stderr)
    return result
