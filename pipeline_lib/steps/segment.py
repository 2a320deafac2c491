"""Instance segmentation of one batch of fields from their decoder maps; writes NGFF labels and a table."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
import pandas as pd
import zarr
from tqdm import tqdm

from ..config import ais_params
from ..engine.runner import failed, run_units
from ..instances.ais import ais_blockwise
from ..io.locks import acquire_all, run_id
from ..io.ngff import set_label_colors
from ..io.ome_zarr import (Plane2DView, check_chunks, create_label_image, open_field, read_json,
                           spatial_label_axes, write_json_atomic)
from ..io.pyramid import build_pyramid
from ..methods import get_method
from ..tiling import block_grid
from .plan import lock_path, recheck_field

TABLE_COLUMNS = ["plate", "well", "row", "column", "field", "label", "area", "centroid_y", "centroid_x"]
_SCRATCH_IN_MEMORY = 64 * 2**20  # pixels; above this the AIS scratch labels live in a zarr on disk


def _tmp_root(cfg: dict[str, Any]) -> str:
    path = os.path.join(cfg["output"], "tmp")
    os.makedirs(path, exist_ok=True)
    return path


def _label_group(cfg: dict[str, Any], plan: dict[str, Any], f: dict[str, Any]):
    acquire_all([(lock_path(f), f"labels/{cfg['labels']['name']} of {f['image']}")], run_id(cfg["output"]))
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


def label_table(f: dict[str, Any], label: np.ndarray, area: np.ndarray, centroid: np.ndarray) -> pd.DataFrame:
    """The per-object rows of one field (``TABLE_COLUMNS``)."""
    return pd.DataFrame({
        "plate": f["plate"], "well": f["well"], "row": f["row"], "column": f["column"], "field": f["field"],
        "label": label.astype(np.uint32), "area": area, "centroid_y": centroid[0], "centroid_x": centroid[1]},
        columns=TABLE_COLUMNS)


def finish_labels(img, group, values: Any = ()) -> None:
    """Downsample level 0 of a written label image into its pyramid (the image's levels and scales), and
    give its label ``values`` their NGFF display colours."""
    _, idx = spatial_label_axes(img)
    scales = [[img.scale(k)[i] for i in idx] for k in range(img.n_levels)]
    build_pyramid(group, [d["path"] for d in img.datasets], scales)
    set_label_colors(group, values, img.version)


def write_field_labels(cfg: dict[str, Any], plan: dict[str, Any], f: dict[str, Any],
                       labels: np.ndarray) -> pd.DataFrame:
    """Write an in-memory 2D label image (consecutive ids) as the field's NGFF labels; return its table."""
    img, group = _label_group(cfg, plan, f)
    Plane2DView(group[img.datasets[0]["path"]])[np.s_[:, :]] = labels
    flat = labels.ravel().astype(np.int64)
    n = int(flat.max()) if flat.size else 0
    finish_labels(img, group, np.arange(1, n + 1))
    area = np.bincount(flat, minlength=n + 1)
    yy, xx = np.indices(labels.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(flat, weights=yy.ravel(), minlength=n + 1) / area
        cx = np.bincount(flat, weights=xx.ravel(), minlength=n + 1) / area
    return label_table(f, np.arange(1, n + 1), area[1:], np.stack([cy[1:], cx[1:]]))


def segment_field(cfg: dict[str, Any], plan: dict[str, Any], f: dict[str, Any],
                  threads: int = 1) -> tuple[dict, pd.DataFrame | None]:
    """The method's instance step (``methods.Method.instances``) on one field's predictions; the object
    table where the step returns areas and centroids (AIS), else None (the measure step makes the tables)."""
    maps = zarr.open_array(os.path.join(f["predictions"], "0"), mode="r")
    check_chunks(maps, os.path.join(f["predictions"], "0"), cfg["missing_chunks"])
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
        n_blocks = len(block_grid(out.shape, cfg["tiling"]["tile"]))
        spec = get_method(cfg)
        bar = stack.enter_context(tqdm(total=2 * n_blocks, desc=f"  {spec.name} {f['key']}", unit="block",
                                       leave=False, file=sys.stderr, disable=n_blocks < 4))  # within a big field
        res = spec.step("instances")(cfg, maps, out, scratch, lambda name, i: bar.update(), threads)
    finish_labels(img, group, res["label"])
    table = label_table(f, res["label"], res["area"], res["centroid"]) if "area" in res else None
    info = {"status": "ok" if res["n_objects"] else "empty", "n_objects": res["n_objects"],
            **{k: res[k] for k in ("n_rescued",) if k in res}, "seconds": round(time.time() - t0, 3)}
    return info, table


def ais_instances(cfg: dict[str, Any], maps: Any, out: Any, scratch: Any, progress: Any,
                  threads: int = 1) -> dict[str, Any]:
    """AIS (seeded watershed) of one field's decoder maps into ``out``, in ais.block blocks (null: tiling.tile)
    with tiling.halo: the maps are already stitched, so the post-processing block need not be the network's."""
    block = cfg["ais"].get("block") or cfg["tiling"]["tile"]
    return ais_blockwise(maps, out, ais_params(cfg), block=block, halo=cfg["tiling"]["halo"],
                         scratch=scratch, progress=progress, threads=threads)


def run_segment_batch(cfg: dict[str, Any], plan: dict[str, Any], batch: str, predict_marker: str | None,
                      out_json: str, threads: int = 1) -> dict[str, Any]:
    """Segment every field of ``batch``; failures are recorded per field and do not stop the others.
    ``threads``: the job's cores (Snakemake's ``threads``), used for the AIS blocks of each field."""
    fields = [plan["fields"][i] for i in plan["batches"][batch]]
    upstream = read_json(predict_marker)["fields"] if predict_marker else {}
    def work(f: dict[str, Any]) -> dict[str, Any]:
        prior = upstream.get(f["key"], {})
        if prior.get("status") == "failed":
            return failed(prior.get("error"), n_objects=0)
        return segment_field(cfg, plan, recheck_field(cfg, plan, f), threads)[0]

    status = run_units([(f["key"], f) for f in fields], work, f"segment {batch}",
                       on_error=lambda f, err: failed(err, n_objects=0))
    return write_batch_outputs(batch, status, out_json)


def write_batch_outputs(batch: str, status: dict, out_json: str, **extra: Any) -> dict[str, Any]:
    """The per-batch status (JSON, atomically): the marker the measure step and reruns go by. The object
    tables come from the measure step, which reads the written labels."""
    result = {"batch": batch, **extra, "fields": status}
    write_json_atomic(out_json, result)
    return result
