"""Measure the objects of one batch of segmented fields: features in every channel, accuracy against
ground truth, an AnnData feature table next to each image, and per-field summaries for aggregation."""
from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..engine.runner import run_units
from ..io.locks import acquire_all, run_id
from ..io.ome_zarr import (InputError, Multiscale, Plane2D, Plane2DView, check_chunks, open_field, open_group,
                           pixel_size_um, read_json, read_multiscale, write_atomic, write_json_atomic)
from ..io.tables import write_feature_table
from ..measure.metrics import count_overlaps, merge_overlaps, scores_from_overlaps
from ..measure.regionprops import channel_columns, measure_labels
from .plan import lock_path

KEY_COLUMNS = ["plate", "well", "row", "column", "field"]
ROW_GROUP = 65536  # objects per Parquet row group of the batch tables (aggregate reads one group at a time)
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
    table = features  # the AnnData table is written: the keys go into the same frame (no copy of it)
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


def _concat_tables(parts: list[str], out: str) -> None:
    """The fields' tables as one Parquet file, row group by row group (an empty table with the keys if none)."""
    if not parts:
        pd.DataFrame(columns=KEY_COLUMNS + ["label"]).to_parquet(out, index=False)
        return
    tables = [pq.read_table(p) for p in parts[:1]]
    schema = pa.unify_schemas([pq.read_schema(p) for p in parts], promote_options="permissive") \
        if len(parts) > 1 else tables[0].schema
    with pq.ParquetWriter(out, schema) as w:
        for p in parts:
            f = pq.ParquetFile(p)
            for g in range(f.num_row_groups):
                t = f.read_row_group(g)
                w.write_table(_conform(t, schema))


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """``t`` with the columns of ``schema`` (in its order; missing ones null), cast to its types."""
    cols = [t.column(n) if n in t.column_names else pa.nulls(len(t), schema.field(n).type) for n in schema.names]
    return pa.Table.from_arrays(cols, schema=schema.remove_metadata()).cast(schema)


def run_measure_batch(cfg: dict[str, Any], plan: dict[str, Any], batch: str, segment_json: str,
                      out_json: str, out_table: str) -> dict[str, Any]:
    """Measure every segmented field of ``batch``; a field that fails is recorded, the others go on."""
    fields = [plan["fields"][i] for i in plan["batches"][batch]]
    upstream = read_json(segment_json)["fields"]
    parts: list[str] = []

    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out_table)), prefix=".measure.") as tmp:
        def work(f: dict[str, Any]) -> dict[str, Any]:
            s = dict(upstream.get(f["key"], {"status": "missing", "n_objects": 0}))
            if s["status"] in ("failed", "missing"):
                return s
            info, table = measure_field(cfg, plan, f)
            parts.append(os.path.join(tmp, f"{len(parts)}.parquet"))  # to disk at once: one field in memory
            table.to_parquet(parts[-1], index=False, row_group_size=ROW_GROUP)
            return {**s, **info}

        status = run_units([(f["key"], f) for f in fields], work, f"measure {batch}", on_error=lambda f, err: {
            **upstream.get(f["key"], {}), "status": "failed", "n_objects": 0,
            "error": f"measuring {f['path'] or 'image'}: {err}"})
        write_atomic(out_table, lambda p: _concat_tables(parts, p))
    result = {"batch": batch, "fields": status}
    write_json_atomic(out_json, result)
    return result
