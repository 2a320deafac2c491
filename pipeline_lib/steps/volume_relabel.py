"""Pass 4 over a volume: apply the lookup table block by block, build the label pyramid of each slab, and
measure the objects; then the summary of the whole volume.

A batch's pieces are one contiguous id range, so a job reads only that range of ``lut.npy`` (memory-mapped).
Each slab owns disjoint chunks of every pyramid level (chunks are one slice deep), so jobs never write the
same chunk.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import pandas as pd
import zarr
from tqdm import tqdm

from ..io.ngff import set_label_colors
from ..io.ome_zarr import LeadingView, open_field, read_json, spatial_label_axes, write_atomic, write_json_atomic
from ..io.pyramid import downsample_region
from ..measure.objects3d import PARTIAL, block_partials, combine_partials, object_table
from ..stitch.merge3d import fill_z_gaps
from ..stitch.volume_grid import unit_offsets
from .volume_plan import plan_grid
from .volume_stitch import gather_counts


def _label_levels(plan: dict[str, Any]) -> tuple[list[LeadingView], list[list[float]]]:
    """(z, y, x) views of every label level and each level's zyx scale over level 0."""
    img = open_field(plan["input"], "")
    group = zarr.open_group(plan["labels"], mode="r+")
    _, idx = spatial_label_axes(img)
    scales = [[img.scale(k)[i] for i in idx][-3:] for k in range(img.n_levels)]
    views = [LeadingView(group[d["path"]]) for d in img.datasets]
    ratios = [[b / a if a else 1.0 for a, b in zip(scales[0], s)] for s in scales]
    return views, ratios


def run_volume_relabel_batch(cfg: dict[str, Any], plan: dict[str, Any], batch: str, segment_jsons: Sequence[str],
                             lut_path: str, out_json: str, out_table: str, merge_json: str | None = None
                             ) -> dict[str, Any]:
    """Pass 4 for the slabs of ``batch``; gaps are filled up to the gap the merge used (``merge_json``,
    derived from the data; the configured ``max_gap`` without it)."""
    from ..config import merge3d_params
    grid = plan_grid(plan)
    counts, _ = gather_counts(grid, segment_jsons)
    off, _ = unit_offsets(counts)
    slabs = plan["batches"][batch]
    params = merge3d_params(cfg)
    if merge_json is not None:
        params = replace(params, max_gap=int(read_json(merge_json).get("max_gap", params.max_gap)))
    fill = params.fill_gaps and params.rule == "overlap" and params.max_gap > 0
    reach = params.max_gap * (params.max_gap + 1) // 2 if fill else 0  # z-halo the gap filling reads
    n_z = grid.shape[0]
    first = grid.slab_of(max(0, grid.slab(slabs[0])[0] - reach))
    last = grid.slab_of(min(n_z, grid.slab(slabs[-1])[1] + reach) - 1)
    lo = int(off[first, 0, 0])
    hi = int(off[last, -1, -1] + counts[last, -1, -1])  # last id these slabs (and their z-halo) can hold
    lut = np.zeros(hi - lo + 1, np.uint32)  # index 0: background; 1.. = ids lo+1 .. hi
    lut[1:] = np.load(lut_path, mmap_mode="r")[lo + 1:hi + 1]
    scratch = zarr.open_array(os.path.join(plan["scratch"], "pieces.zarr"), mode="r")
    levels, ratios = _label_levels(plan)
    parts = []
    t0 = time.time()
    for s in tqdm(slabs, desc=f"relabel {batch}", unit="slab", file=sys.stderr):
        z0, z1 = grid.slab(s)
        a, b = max(0, z0 - reach), min(n_z, z1 + reach)
        for t, tile in enumerate(grid.tiles):
            ids = lut[grid.global_ids(np.asarray(scratch[(slice(a, b),) + tile.inner]), off, t, a, shift=lo)]
            if fill:
                ids = fill_z_gaps(ids, params.max_gap)
            ids = ids[z0 - a:z1 - a]
            levels[0][(slice(z0, z1),) + tile.inner] = ids
            parts.append(block_partials(ids, (z0, tile.inner[0].start, tile.inner[1].start)))
        region = (slice(z0, z1), slice(0, grid.shape[1]), slice(0, grid.shape[2]))
        downsample_region(levels[0], levels[1:], ratios[1:], region)
    partial = combine_partials(parts)
    write_atomic(out_table, lambda p: partial.to_parquet(p, index=False))
    result = {"batch": batch, "n_labels": int(len(partial)), "seconds": round(time.time() - t0, 3)}
    write_json_atomic(out_json, result)
    return result


def aggregate_volume(cfg: dict[str, Any], plan: dict[str, Any], model_info: dict[str, Any],
                     segment_jsons: Sequence[str], merge_json: str, tables: Sequence[str], summary_path: str,
                     objects_path: str) -> dict[str, Any]:
    """objects.parquet (3D properties per object) and summary.json (blocks, merge statistics, config)."""
    grid = plan_grid(plan)
    _, blocks = gather_counts(grid, segment_jsons)
    img = open_field(plan["input"], "")
    names = img.axis_names
    voxel = [img.scale(0)[names.index(a)] for a in "zyx"]
    units = {a["name"]: a.get("unit") for a in img.axes}
    partial = combine_partials([pd.read_parquet(p, columns=PARTIAL) for p in tables])
    objects = object_table(partial, voxel)
    set_label_colors(zarr.open_group(plan["labels"], mode="r+"), objects["label"].to_numpy(), plan["version"])
    write_atomic(objects_path, lambda p: objects.to_parquet(p, index=False))
    status = pd.Series([b["status"] for b in blocks.values()]).value_counts().to_dict()
    failed = {k: b.get("error") for k, b in blocks.items() if b["status"] == "failed"}
    summary = {"input": plan["input"], "kind": "volume", "method": cfg["method"], "model": model_info,
               "shape": plan["shape"], "voxel_size": voxel, "units": [units.get(a) for a in "zyx"],
               "labels": plan["labels"], "labels_name": cfg["labels"]["name"],
               "grid": {"tile": plan["tile"], "halo": plan["halo"], "z_block": plan["z_block"],
                        "n_slabs": plan["n_slabs"], "n_tiles": plan["n_tiles"], "n_blocks": len(blocks)},
               "block_status_counts": status, "failed_blocks": failed, "merge": read_json(merge_json),
               "n_objects": int(len(objects)),
               "z_extent": {"median": float(objects["z_extent"].median()) if len(objects) else None,
                            "max": int(objects["z_extent"].max()) if len(objects) else None},
               "config": cfg}
    write_json_atomic(summary_path, summary)
    return summary
