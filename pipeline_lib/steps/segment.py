"""Instance segmentation of one batch of fields from their decoder maps; writes NGFF labels and a table."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import traceback
from typing import Any

import numpy as np
import pandas as pd
import zarr
from tqdm import tqdm

from ..config import ais_params
from ..instances.ais import ais_blockwise
from ..io.ome_zarr import (InputError, Plane2DView, create_label_image, open_field, read_json,
                           spatial_label_axes, write_json_atomic)
from ..io.pyramid import build_pyramid

TABLE_COLUMNS = ["plate", "well", "row", "column", "field", "label", "area", "centroid_y", "centroid_x"]
_SCRATCH_IN_MEMORY = 64 * 2**20  # pixels; above this the AIS scratch labels live in a zarr on disk


def _tmp_root(cfg: dict[str, Any]) -> str:
    path = os.path.join(cfg["output"], "tmp")
    os.makedirs(path, exist_ok=True)
    return path


def _label_group(cfg: dict[str, Any], plan: dict[str, Any], f: dict[str, Any]):
    img = open_field(plan["input"], f["path"])
    if cfg["labels"]["store"]:
        parent = zarr.open_group(os.path.dirname(os.path.dirname(f["labels"])), mode="a",
                                 zarr_format=plan["zarr_format"])
        source = f["image"]
    else:
        parent = zarr.open_group(f["image"], mode="a")
        source = "../../"
    group = create_label_image(parent, img, cfg["labels"]["name"], chunks=(cfg["tiling"]["tile"],) * 2,
                               overwrite=True, source=source)
    return img, group


def segment_field(cfg: dict[str, Any], plan: dict[str, Any], f: dict[str, Any]) -> tuple[dict, pd.DataFrame]:
    maps = zarr.open_array(os.path.join(f["predictions"], "0"), mode="r")
    img, group = _label_group(cfg, plan, f)
    level0 = group[img.datasets[0]["path"]]
    out = Plane2DView(level0)
    with contextlib.ExitStack() as stack:
        scratch = None
        if int(np.prod(out.shape)) > _SCRATCH_IN_MEMORY:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(dir=_tmp_root(cfg), prefix=f"{f['key']}."))
            scratch = zarr.create_array(os.path.join(tmp, "scratch.zarr"), shape=out.shape, dtype="uint64",
                                        chunks=(cfg["tiling"]["tile"],) * 2, fill_value=0)
        t0 = time.time()
        res = ais_blockwise(maps, out, ais_params(cfg), block=cfg["tiling"]["tile"], halo=cfg["tiling"]["halo"],
                            scratch=scratch)
    _, idx = spatial_label_axes(img)
    scales = [[img.scale(k)[i] for i in idx] for k in range(img.n_levels)]
    build_pyramid(group, [d["path"] for d in img.datasets], scales)
    table = pd.DataFrame({
        "plate": f["plate"], "well": f["well"], "row": f["row"], "column": f["column"], "field": f["field"],
        "label": res["label"].astype(np.uint32), "area": res["area"],
        "centroid_y": res["centroid"][0], "centroid_x": res["centroid"][1]}, columns=TABLE_COLUMNS)
    info = {"status": "ok" if res["n_objects"] else "empty", "n_objects": res["n_objects"],
            "n_rescued": res["n_rescued"], "seconds": round(time.time() - t0, 3)}
    return info, table


def run_segment_batch(cfg: dict[str, Any], plan: dict[str, Any], batch: str, predict_marker: str | None,
                      out_json: str, out_table: str) -> dict[str, Any]:
    """Segment every field of ``batch``; failures are recorded per field and do not stop the others."""
    fields = [plan["fields"][i] for i in plan["batches"][batch]]
    upstream = read_json(predict_marker)["fields"] if predict_marker else {}
    status, tables = {}, []
    for f in tqdm(fields, desc=f"segment {batch}", unit="field", file=sys.stderr):
        prior = upstream.get(f["key"], {})
        if "error" in f or prior.get("status") == "failed":
            status[f["key"]] = {"status": "failed", "n_objects": 0, "error": f.get("error") or prior.get("error")}
            continue
        try:
            info, table = segment_field(cfg, plan, f)
            status[f["key"]] = info
            tables.append(table)
        except (InputError, OSError, ValueError, KeyError) as e:
            traceback.print_exc()
            status[f["key"]] = {"status": "failed", "n_objects": 0, "error": f"{type(e).__name__}: {e}"}
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=TABLE_COLUMNS)
    os.makedirs(os.path.dirname(out_table), exist_ok=True)
    tmp = out_table + ".tmp"
    table.to_parquet(tmp, index=False)
    os.replace(tmp, out_table)
    result = {"batch": batch, "fields": status}
    write_json_atomic(out_json, result)
    return result
