"""Measure the objects of one batch of segmented fields: features in every channel, accuracy against
ground truth, an AnnData feature table next to each image, and per-field summaries for aggregation."""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pandas as pd

from ..engine.runner import run_units
from ..io.locks import acquire_all, run_id
from ..io.ome_zarr import (InputError, Multiscale, Plane2D, Plane2DView, check_chunks, open_field, open_group,
                           pixel_size_um, read_json, read_multiscale, write_atomic, write_json_atomic)
from ..io.tables import write_feature_table
from ..measure.metrics import count_overlaps, merge_overlaps, scores_from_overlaps
from ..measure.regionprops import channel_columns, measure_labels
from .plan import lock_path

KEY_COLUMNS = ["plate", "well", "row", "column", "field"]
MEASURE_BLOCK = 2048  # pixels per side read at a time: bounds memory for fields of any size


def channel_planes(img: Multiscale) -> tuple[list[Plane2D], list[str]]:
    """Every channel of the image as a lazy 2D plane, with its OMERO name (or c<i>)."""
    if "c" not in img.axis_names:
        return [Plane2D(img, None)], (img.channel_names() or ["c0"])[:1]
    n = img.shape[img.axis_names.index("c")]
    names = img.channel_names()
    return [Plane2D(img, c) for c in range(n)], [names[c] if c < len(names) and names[c] else f"c{c}"
                                                for c in range(n)]


def label_view(path: str) -> Plane2DView:
    """Level 0 of the NGFF label image at ``path`` as (y, x)."""
    return Plane2DView(read_multiscale(open_group(path), path).level(0))


def blockwise_scores(pred: Any, true: Any, block: int = MEASURE_BLOCK) -> dict[str, float]:
    """mSA, SA50 and error rate of ``pred`` against ``true`` from overlap counts summed over blocks."""
    if tuple(pred.shape) != tuple(true.shape):
        raise InputError(f"ground truth has shape {tuple(true.shape)}, the labels {tuple(pred.shape)}.")
    h, w = pred.shape
    parts = [count_overlaps(pred[y:y + block, x:x + block], true[y:y + block, x:x + block])
             for y in range(0, h, block) for x in range(0, w, block)]
    return scores_from_overlaps(merge_overlaps(parts))


def field_summary(table: pd.DataFrame, suffixes: list[str]) -> dict[str, Any]:
    """Sums and medians of one field's objects, enough to build fields.csv and wells.csv without the table."""
    area = table["area"].to_numpy(np.float64) if len(table) else np.zeros(0)
    out = {"n_objects": int(len(table)), "area_sum": float(area.sum()),
           "median_area_px": float(np.median(area)) if len(area) else None,
           "intensity_sums": {s: float(table[f"intensity_mean_{s}"].sum()) if len(table) else 0.0 for s in suffixes},
           # objects with a finite mean (NaN when every pixel of the object is NaN / inf): nanmean-style
           "intensity_counts": {s: int(table[f"intensity_mean_{s}"].notna().sum()) if len(table) else 0
                                for s in suffixes}}
    return out


def measure_field(cfg: dict[str, Any], plan: dict[str, Any], f: dict[str, Any]) -> tuple[dict, pd.DataFrame]:
    """Features, feature table and (with ``ground_truth``) scores of one segmented field."""
    t0 = time.time()
    img = open_field(plan["input"], f["path"])
    check_chunks(img.level(0), f"{f['image']}/{img.datasets[0]['path']}", cfg["missing_chunks"])
    acquire_all([(lock_path(f), f"labels/{cfg['labels']['name']} of {f['image']}")], run_id(cfg["output"]))
    planes, names = channel_planes(img)
    labels = label_view(f["labels"])
    features = measure_labels(labels, planes, names, block=MEASURE_BLOCK)
    px = pixel_size_um(img)
    features["area_um2"] = features["area"] * px * px if px else np.nan
    write_feature_table(os.path.dirname(os.path.dirname(f["labels"])), cfg["labels"]["name"],
                        cfg["labels"]["name"], features)
    table = features.copy()
    for i, k in enumerate(KEY_COLUMNS):
        table.insert(i, k, f[k])
    table["label"] = table["label"].astype(np.uint32)
    suffixes = channel_columns(names)
    nonfinite = {k: v for k, v in features.attrs.get("n_nonfinite", {}).items() if v}
    info: dict[str, Any] = {"channels": suffixes, "pixel_size_um": px,
                            **({"n_nonfinite": nonfinite} if nonfinite else {}),
                            "field_area_px": int(np.prod(labels.shape)), **field_summary(table, suffixes)}
    gt = cfg.get("ground_truth")
    if gt:
        gt_path = os.path.join(f["image"], "labels", gt)
        if os.path.exists(gt_path):
            info["scores"] = blockwise_scores(labels, label_view(gt_path))
        else:
            info["scores"] = None
            info["ground_truth_missing"] = gt_path
    info["measure_seconds"] = round(time.time() - t0, 3)
    return info, table


def run_measure_batch(cfg: dict[str, Any], plan: dict[str, Any], batch: str, segment_json: str,
                      out_json: str, out_table: str) -> dict[str, Any]:
    """Measure every segmented field of ``batch``; a field that fails is recorded, the others go on."""
    fields = [plan["fields"][i] for i in plan["batches"][batch]]
    upstream = read_json(segment_json)["fields"]
    tables = []

    def work(f: dict[str, Any]) -> dict[str, Any]:
        s = dict(upstream.get(f["key"], {"status": "missing", "n_objects": 0}))
        if s["status"] in ("failed", "missing"):
            return s
        info, table = measure_field(cfg, plan, f)
        tables.append(table)
        return {**s, **info}

    status = run_units([(f["key"], f) for f in fields], work, f"measure {batch}", on_error=lambda f, err: {
        **upstream.get(f["key"], {}), "status": "failed", "n_objects": 0,
        "error": f"measuring {f['path'] or 'image'}: {err}"})
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=KEY_COLUMNS + ["label"])
    write_atomic(out_table, lambda p: table.to_parquet(p, index=False))
    result = {"batch": batch, "fields": status}
    write_json_atomic(out_json, result)
    return result
