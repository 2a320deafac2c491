"""Predict decoder maps for one batch of fields (one GPU job, model loaded once).

Tile batches flow through a bounded pipeline (``engine.overlap``): a reader thread reads and preprocesses
the next batch and a writer thread writes the previous batch's maps while the device works on the
current one. The device-busy fraction and the stage split go into the job's marker and log.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any

import zarr
from tqdm import tqdm

from ..embed.predict import FieldTask, field_value_range, predict_stages, tile_batches
from ..engine.overlap import DeviceClock, StageTimes, run_pipeline, timing_line
from ..engine.runner import run_units
from ..io.ome_zarr import Plane2D, create_predictions_image, open_field, write_json_atomic
from ..tiling import block_grid
from .model import load_resolved
from .plan import recheck_field


def field_task(cfg: dict[str, Any], plan: dict[str, Any], f: dict[str, Any],
               with_predictions: bool = True) -> FieldTask:
    """The field's 2D plane to encode, and (``with_predictions``) its fresh predictions image to fill."""
    img = open_field(plan["input"], f["path"])
    plane = Plane2D(img, img.channel_index(cfg["channel"]))
    out = None
    if with_predictions:
        group = zarr.open_group(f["predictions"], mode="a", zarr_format=plan["zarr_format"])
        out = create_predictions_image(group, plane.shape, (cfg["tiling"]["tile"],) * 2, plan["version"])
    vr = field_value_range(plane) if cfg["encoder"]["normalization"] == "field" else None
    return FieldTask(f["key"], plane, out, vr)


def predict_tasks(model, tasks: list[FieldTask], tile: int, halo: int, batch_size: int, precision: str,
                  overlap: bool = True, progress=None) -> tuple[dict[str, str], dict[str, Any]]:
    """Fill ``task.out`` of every task; (failed key -> message, timing record). ``overlap=False`` runs the
    same stages one batch after the other."""
    failed: dict[str, str] = {}
    clock, times = DeviceClock(model.device), StageTimes()
    stages = predict_stages(model, tile, halo, precision, failed, clock, progress)
    outs = run_pipeline(tile_batches(tasks, tile, halo, batch_size), stages, depth=1, threaded=overlap, times=times)
    with contextlib.closing(outs):
        for out in outs:
            if out.error is not None:
                raise out.error
    return failed, {**clock.report(times), "overlap": overlap}


def run_predict_batch(cfg: dict[str, Any], plan: dict[str, Any], batch: str, model_info: dict[str, Any],
                      marker: str, overlap: bool = True) -> dict[str, Any]:
    """Write predictions for every field of ``batch``; a field that fails is reported, the others finish."""
    fields = [plan["fields"][i] for i in plan["batches"][batch]]
    model = load_resolved(model_info, cfg["model"]["device"], require_decoder=True,
                          compile=cfg["encoder"]["compile"])
    tasks = []

    def prepare(f: dict[str, Any]) -> dict[str, Any]:
        tasks.append(field_task(cfg, plan, recheck_field(cfg, plan, f)))
        return {"status": "ok"}

    status = run_units([(f["key"], f) for f in fields], prepare, f"open {batch}")
    t, h = cfg["tiling"]["tile"], cfg["tiling"]["halo"]
    n_tiles = sum(len(block_grid(task.image.shape, t)) for task in tasks)
    with tqdm(total=n_tiles, desc=f"predict {batch} ({model.device})", unit="tile", file=sys.stderr) as bar:
        failed, timing = predict_tasks(model, tasks, t, h, cfg["encoder"]["batch_size"], cfg["encoder"]["precision"],
                                       overlap, bar.update)
    for task in tasks:
        status[task.key] = {"status": "failed", "error": failed[task.key]} if task.key in failed else {"status": "ok"}
    print(timing_line(f"predict {batch}", timing), file=sys.stderr)
    result = {"batch": batch, "device": str(model.device), "timing": timing, "fields": status}
    write_json_atomic(marker, result)
    return result
