"""Predict decoder maps for one batch of fields (one GPU job, model loaded once)."""
from __future__ import annotations

import sys
from typing import Any

import zarr
from tqdm import tqdm

from ..embed.predict import FieldTask, field_value_range, predict_maps
from ..engine.runner import run_units
from ..io.ome_zarr import InputError, Plane2D, create_predictions_image, open_field, write_json_atomic
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


def run_predict_batch(cfg: dict[str, Any], plan: dict[str, Any], batch: str, model_info: dict[str, Any],
                      marker: str) -> dict[str, Any]:
    """Write predictions for every field of ``batch``; a field that fails is reported, the others finish."""
    fields = [plan["fields"][i] for i in plan["batches"][batch]]
    model = load_resolved(model_info, cfg["model"]["device"], require_decoder=True)
    tasks = []

    def prepare(f: dict[str, Any]) -> dict[str, Any]:
        tasks.append(field_task(cfg, plan, recheck_field(cfg, plan, f)))
        return {"status": "ok"}

    status = run_units([(f["key"], f) for f in fields], prepare, f"open {batch}")
    t, h = cfg["tiling"]["tile"], cfg["tiling"]["halo"]
    n_tiles = sum(len(block_grid(task.image.shape, t)) for task in tasks)
    kw = dict(tile=t, halo=h, batch_size=cfg["encoder"]["batch_size"], precision=cfg["encoder"]["precision"])
    with tqdm(total=n_tiles, desc=f"predict {batch} ({model.device})", unit="tile", file=sys.stderr) as bar:
        try:
            predict_maps(model, tasks, progress=bar.update, **kw)
            for task in tasks:
                status[task.key] = {"status": "ok"}
        except InputError:
            # isolate the broken field(s): redo field by field
            status.update(run_units([(task.key, task) for task in tasks],
                                    lambda task: (predict_maps(model, [task], **kw), {"status": "ok"})[1],
                                    f"predict {batch} field by field"))
    result = {"batch": batch, "device": str(model.device), "fields": status}
    write_json_atomic(marker, result)
    return result
