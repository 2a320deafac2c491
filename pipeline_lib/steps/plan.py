"""Enumerate the fields of the input, check them, and split them into job batches (the checkpoint step)."""
from __future__ import annotations

import errno
import os
from typing import Any

from ..io.locks import acquire_all, release_all, run_id
from ..io.ome_zarr import (InputError, Plane2D, StoreLayout, check_chunks, describe_store, mirror_plate, open_field,
                           open_group, write_json_atomic)
from ..io.volume import is_volume
from ..methods import STORE_KIND_KEY, STORE_KINDS, get_method, method_label_name, method_names
from .volume_plan import create_volume_stores, make_volume_plan


def predictions_root(cfg: dict[str, Any]) -> str:
    return os.path.abspath(cfg["predictions"] or os.path.join(cfg["output"], "predictions.ome.zarr"))


def labels_root(cfg: dict[str, Any]) -> str:
    return os.path.abspath(cfg["labels"]["store"] or cfg["input"])


def _join(root: str, rel: str, *parts: str) -> str:
    return os.path.join(root, rel, *parts) if rel else os.path.join(root, *parts)


def mark_predictions_kind(store: str, kind: str) -> None:
    """Record in a predictions store's root which kind of maps it holds (``methods.STORE_KINDS``)."""
    import zarr
    zarr.open_group(store, mode="a").attrs[STORE_KIND_KEY] = kind


def predictions_kind(store: str) -> str | None:
    """The kind recorded by :func:`mark_predictions_kind`; None for stores written without it."""
    import zarr
    try:
        return zarr.open_group(store, mode="r").attrs.get(STORE_KIND_KEY)
    except (OSError, ValueError, KeyError, zarr.errors.BaseZarrError):
        return None


def check_predictions_kind(cfg: dict[str, Any]) -> None:
    """A given ``predictions`` store must hold the kind of maps the method reads (SAM maps vs flows)."""
    if not cfg.get("predictions"):
        return
    want, have = get_method(cfg).store, predictions_kind(cfg["predictions"])
    if have is not None and have != want:
        raise InputError(f"predictions: '{cfg['predictions']}' holds {STORE_KINDS.get(have, have)}, but method "
                         f"'{cfg['method']}' reads {STORE_KINDS.get(want, want)}. Point `predictions` at a store "
                         "written by that method, or change `method`.")


def check_field(cfg: dict[str, Any], root: str, entry: dict[str, Any]) -> None:
    """Open the field, fill in its plane shape and dtype, and check its chunks and predictions; an
    InputError names the file and the fix. Run by the plan and again by the jobs for a field that failed
    here (``recheck_field``), so that an error in the data does not stick once the data is fixed."""
    img = open_field(root, entry["path"])
    plane = Plane2D(img, img.channel_index(cfg["channel"]))
    entry["shape"] = list(plane.shape)
    entry["dtype"] = str(plane.dtype)
    check_chunks(img.level(0), f"{entry['image']}/{img.datasets[0]['path']}", cfg["missing_chunks"])
    if cfg.get("predictions"):
        try:
            arr = open_group(entry["predictions"])["0"]
        except (InputError, KeyError):
            raise InputError(f"predictions for field '{entry['path'] or 'image'}' not found at "
                             f"{entry['predictions']}/0") from None
        if tuple(arr.shape) != (3, *entry["shape"]):
            raise InputError(f"predictions at {entry['predictions']}/0 have shape {tuple(arr.shape)}, expected "
                             f"{(3, *entry['shape'])}: they were computed for other data.")


def recheck_field(cfg: dict[str, Any], plan: dict[str, Any], f: dict[str, Any]) -> dict[str, Any]:
    """The field's plan entry, re-checked when planning found an error (raises the current error)."""
    if "error" not in f:
        return f
    fresh = {k: v for k, v in f.items() if k != "error"}
    check_field(cfg, plan["input"], fresh)
    return fresh


def make_plan(cfg: dict[str, Any], layout: StoreLayout | None = None) -> dict[str, Any]:
    """The job plan: fields with their image, predictions and labels paths, and batches of field indices."""
    layout = layout or describe_store(cfg["input"])
    root = os.path.abspath(cfg["input"])
    pred_root = predictions_root(cfg) if get_method(cfg).store else None  # e.g. AMG has no decoder maps
    lab_root = labels_root(cfg)
    if cfg.get("predictions") and not os.path.exists(cfg["predictions"]):
        raise InputError(f"predictions: '{cfg['predictions']}' does not exist. Point it at "
                         "<output>/predictions.ome.zarr of an earlier run, or remove the key to run the model.")
    check_predictions_kind(cfg)
    fields, errors = [], []
    for ref in layout.fields:
        entry = dict(ref.to_dict(), key=ref.key, image=_join(root, ref.path),
                     predictions=_join(pred_root, ref.path) if pred_root else None, labels=_join(lab_root, ref.path, "labels",
                                                                          cfg["labels"]["name"]))
        entry["labels_by_method"] = {m: _join(lab_root, ref.path, "labels", method_label_name(cfg, m))
                                     for m in method_names(cfg)}  # for the comparison of methods
        try:
            check_field(cfg, root, entry)
        except InputError as e:
            entry["error"] = str(e)
            errors.append(str(e))
        fields.append(entry)
    if errors and len(errors) == len(fields):
        raise InputError(f"no field of '{cfg['input']}' can be read:\n  " + "\n  ".join(sorted(set(errors))[:5]))
    n = cfg["batching"]["fields_per_job"]
    batches = [list(range(i, min(i + n, len(fields)))) for i in range(0, len(fields), n)]
    meta = layout.plate_meta or {}
    return {"input": root, "kind": layout.kind, "version": layout.version, "zarr_format": layout.zarr_format,
            "plate_rows": [str(r["name"]) for r in meta.get("rows", [])],
            "plate_columns": [str(c["name"]) for c in meta.get("columns", [])],
            "predictions_root": pred_root, "labels_root": lab_root, "fields": fields,
            "batches": {f"b{i:04d}": b for i, b in enumerate(batches)}}


def lock_path(f: dict[str, Any]) -> str:
    """The lock file of a field's label image: ``labels/<name>.lock`` next to it."""
    return f"{f['labels']}.lock"


def lock_labels(cfg: dict[str, Any], plan: dict[str, Any]) -> None:
    """Lock every label image this run will write (before any other write): refuses a second run on the
    same labels, and finds a read-only label location now rather than after the GPU work."""
    items = [(lock_path(f), f"labels/{cfg['labels']['name']} of {f['image']}") for f in plan["fields"]
             if "error" not in f]  # a field that failed here takes its lock in the job that redoes it
    try:
        acquire_all(items, run_id(cfg["output"]))
    except PermissionError as e:
        raise _read_only(cfg, e) from e
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise _read_only(cfg, e) from e
        raise


def _read_only(cfg: dict[str, Any], e: OSError) -> InputError:
    where = ("labels.store" if cfg["labels"]["store"] else "the input") + f" '{labels_root(cfg)}'"
    fix = ("Point labels.store at a writable location." if cfg["labels"]["store"] else
           "Set labels.store to a writable path: the labels then go into a separate OME-Zarr that mirrors "
           "the plate.")
    return InputError(f"cannot write the label images into {where} ({e.strerror}: {e.filename}). {fix}")


def release_labels(cfg: dict[str, Any], plan: dict[str, Any]) -> int:
    """Remove this run's label locks (at the end of a complete run)."""
    return release_all([lock_path(f) for f in plan["fields"]], run_id(cfg["output"]))


def write_plan(cfg: dict[str, Any], path: str) -> dict[str, Any]:
    """Make the plan, create the plate/well hierarchy of the output stores (metadata written once here)."""
    layout = describe_store(cfg["input"])
    if layout.kind == "image" and is_volume(open_field(cfg["input"], "")):
        plan = make_volume_plan(cfg, layout)
        create_volume_stores(cfg, plan)
        write_json_atomic(path, plan)
        return plan
    plan = make_plan(cfg, layout)
    lock_labels(cfg, plan)
    if plan["predictions_root"] and not cfg.get("predictions"):
        mirror_plate(layout, plan["predictions_root"])
        mark_predictions_kind(plan["predictions_root"], get_method(cfg).store)
    if cfg["labels"]["store"]:  # a valid plate of placeholder images, the labels under them (io/ngff.py)
        mirror_plate(layout, plan["labels_root"], placeholders=True)
    write_json_atomic(path, plan)
    return plan
