"""Enumerate the fields of the input, check them, and split them into job batches (the checkpoint step)."""
from __future__ import annotations

import os
from typing import Any

from ..io.ome_zarr import (InputError, Plane2D, StoreLayout, describe_store, mirror_plate, open_field, open_group,
                           write_json_atomic)
from ..io.volume import is_volume
from .volume_plan import create_volume_stores, make_volume_plan


def predictions_root(cfg: dict[str, Any]) -> str:
    return os.path.abspath(cfg["predictions"] or os.path.join(cfg["output"], "predictions.ome.zarr"))


def labels_root(cfg: dict[str, Any]) -> str:
    return os.path.abspath(cfg["labels"]["store"] or cfg["input"])


def _join(root: str, rel: str, *parts: str) -> str:
    return os.path.join(root, rel, *parts) if rel else os.path.join(root, *parts)


def make_plan(cfg: dict[str, Any], layout: StoreLayout | None = None) -> dict[str, Any]:
    """The job plan: fields with their image, predictions and labels paths, and batches of field indices."""
    layout = layout or describe_store(cfg["input"])
    root = os.path.abspath(cfg["input"])
    pred_root = None if cfg["method"] == "amg" else predictions_root(cfg)  # AMG has no decoder maps
    lab_root = labels_root(cfg)
    fields, errors = [], []
    for ref in layout.fields:
        entry = dict(ref.to_dict(), key=ref.key, image=_join(root, ref.path),
                     predictions=_join(pred_root, ref.path) if pred_root else None, labels=_join(lab_root, ref.path, "labels",
                                                                          cfg["labels"]["name"]))
        try:
            img = open_field(root, ref)
            plane = Plane2D(img, img.channel_index(cfg["channel"]))
            entry["shape"] = list(plane.shape)
            entry["dtype"] = str(plane.dtype)
        except InputError as e:
            entry["error"] = str(e)
            errors.append(str(e))
        fields.append(entry)
    if errors and len(errors) == len(fields):
        raise InputError(f"no field of '{cfg['input']}' can be read:\n  " + "\n  ".join(sorted(set(errors))[:5]))
    if cfg.get("predictions"):
        _check_predictions(cfg["predictions"], fields)
    n = cfg["batching"]["fields_per_job"]
    batches = [list(range(i, min(i + n, len(fields)))) for i in range(0, len(fields), n)]
    meta = layout.plate_meta or {}
    return {"input": root, "kind": layout.kind, "version": layout.version, "zarr_format": layout.zarr_format,
            "plate_rows": [str(r["name"]) for r in meta.get("rows", [])],
            "plate_columns": [str(c["name"]) for c in meta.get("columns", [])],
            "predictions_root": pred_root, "labels_root": lab_root, "fields": fields,
            "batches": {f"b{i:04d}": b for i, b in enumerate(batches)}}


def _check_predictions(path: str, fields: list[dict]) -> None:
    if not os.path.exists(path):
        raise InputError(f"predictions: '{path}' does not exist. Point it at <output>/predictions.ome.zarr of "
                         "an earlier run, or remove the key to run the model.")
    for f in fields:
        if "error" in f:
            continue
        try:
            arr = open_group(f["predictions"])["0"]
        except Exception:  # noqa: BLE001
            f["error"] = f"predictions for field '{f['path'] or 'image'}' not found at {f['predictions']}/0"
            continue
        if tuple(arr.shape) != (3, *f["shape"]):
            f["error"] = (f"predictions at {f['predictions']}/0 have shape {tuple(arr.shape)}, expected "
                          f"{(3, *f['shape'])}: they were computed for other data.")


def write_plan(cfg: dict[str, Any], path: str) -> dict[str, Any]:
    """Make the plan, create the plate/well hierarchy of the output stores (metadata written once here)."""
    layout = describe_store(cfg["input"])
    if layout.kind == "image" and is_volume(open_field(cfg["input"], "")):
        plan = make_volume_plan(cfg, layout)
        create_volume_stores(cfg, plan)
        write_json_atomic(path, plan)
        return plan
    plan = make_plan(cfg, layout)
    if plan["predictions_root"] and not cfg.get("predictions"):
        mirror_plate(layout, plan["predictions_root"])
    if cfg["labels"]["store"]:  # a valid plate of placeholder images, the labels under them (io/ngff.py)
        mirror_plate(layout, plan["labels_root"], placeholders=True)
    write_json_atomic(path, plan)
    return plan
