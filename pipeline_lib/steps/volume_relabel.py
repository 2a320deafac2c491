"""Pass 4 over a volume: apply the lookup table block by block, build the label pyramid of each slab, and
measure the objects; then the summary of the whole volume.

A block reads its ids' entries of ``lut.npy`` (memory-mapped). Each block owns disjoint chunks of every
pyramid level (chunks are one slice deep and level k's yx chunks are tile / 2^k, see ``volume_plan``), so
jobs never write the same chunk.
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
from ..io.tables import write_feature_table
from ..io.volume import Volume3D
from ..measure.regionprops import channel_columns
from ..measure.objects3d import block_partials, combine_partials, object_table
from ..stitch.merge3d import fill_z_gaps
from ..stitch.volume_grid import unit_offsets
from .volume_plan import batch_blocks, batch_of_block, plan_grid
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


def channel_indices(img: Any) -> list[int | None]:
    """Every channel of the image (None: no channel axis)."""
    return list(range(img.shape[img.axis_names.index("c")])) if "c" in img.axis_names else [None]


def channel_suffixes(img: Any) -> list[str]:
    """Column suffixes of the channels (OMERO names made safe, c<i> for unnamed ones), as the plate tables."""
    names = img.channel_names()
    return channel_columns([names[i] if i < len(names) and names[i] else f"c{i}"
                            for i in range(len(channel_indices(img)))])


class FailedBlocksError(RuntimeError):
    """Some volume blocks failed: every output is written, and the next run redoes their batches."""


def run_volume_relabel_batch(cfg: dict[str, Any], plan: dict[str, Any], batch: str, segment_jsons: Sequence[str],
                             lut_path: str, out_json: str, out_table: str, merge_json: str | None = None
                             ) -> dict[str, Any]:
    """Pass 4 for the blocks of ``batch``; gaps are filled up to the gap the merge used (``merge_json``,
    derived from the data; the configured ``max_gap`` without it)."""
    from ..config import merge3d_params
    grid = plan_grid(plan)
    counts, _ = gather_counts(grid, segment_jsons)
    off, _ = unit_offsets(counts)
    params = merge3d_params(cfg)
    if merge_json is not None:
        params = replace(params, max_gap=int(read_json(merge_json).get("max_gap", params.max_gap)))
    fill = params.fill_gaps and params.rule == "overlap" and params.max_gap > 0
    reach = params.max_gap * (params.max_gap + 1) // 2 if fill else 0  # z-halo the gap filling reads
    n_z = grid.shape[0]
    lut = np.load(lut_path, mmap_mode="r")  # a block reads only the pages of its own ids
    scratch = zarr.open_array(os.path.join(plan["scratch"], "pieces.zarr"), mode="r")
    levels, ratios = _label_levels(plan)
    img = open_field(plan["input"], "")
    channels = [Volume3D(img, c) for c in channel_indices(img)]  # intensities of every channel
    parts = []
    t0 = time.time()
    for s, t in tqdm(batch_blocks(plan, batch), desc=f"relabel {batch}", unit="block", file=sys.stderr):
        z0, z1 = grid.slab(s)
        a, b = max(0, z0 - reach), min(n_z, z1 + reach)
        tile = grid.tiles[t]
        g = grid.global_ids(np.asarray(scratch[(slice(a, b),) + tile.inner]), off, t, a)
        ids = np.where(g > 0, np.asarray(lut[g.ravel()]).reshape(g.shape), 0).astype(np.uint32)
        del g
        if fill:
            ids = fill_z_gaps(ids, params.max_gap)
        ids = ids[z0 - a:z1 - a]
        region = (slice(z0, z1),) + tile.inner
        levels[0][region] = ids
        values = np.stack([np.asarray(ch[region]) for ch in channels])  # (c, z, y, x) of this block
        parts.append(block_partials(ids, (z0, tile.inner[0].start, tile.inner[1].start), values))
        downsample_region(levels[0], levels[1:], ratios[1:], region)  # the tile owns whole chunks of each level
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
    partial = combine_partials([pd.read_parquet(p) for p in tables])
    suffixes = channel_suffixes(img)
    objects = object_table(partial, voxel, suffixes)
    set_label_colors(zarr.open_group(plan["labels"], mode="r+"), objects["label"].to_numpy(), plan["version"])
    write_atomic(objects_path, lambda p: objects.to_parquet(p, index=False))
    table = write_feature_table(plan["labels_root"], cfg["labels"]["name"], cfg["labels"]["name"], objects)
    status = pd.Series([b["status"] for b in blocks.values()]).value_counts().to_dict()
    failed = {k: b.get("error") for k, b in blocks.items() if b["status"] == "failed"}
    failed_batches = sorted({batch_of_block(plan, int(k[1:6]), int(k[8:])) for k in failed})
    summary = {"input": plan["input"], "kind": "volume", "method": cfg["method"], "model": model_info,
               "shape": plan["shape"], "voxel_size": voxel, "units": [units.get(a) for a in "zyx"],
               "labels": plan["labels"], "labels_name": cfg["labels"]["name"],
               "grid": {"tile": plan["tile"], "halo": plan["halo"], "z_block": plan["z_block"],
                        "n_slabs": plan["n_slabs"], "n_tiles": plan["n_tiles"], "n_blocks": len(blocks)},
               "block_status_counts": status, "failed_blocks": failed, "failed_batches": failed_batches,
               "merge": read_json(merge_json), "channels": suffixes, "table": table,
               "n_objects": int(len(objects)),
               "z_extent": {"median": float(objects["z_extent"].median()) if len(objects) else None,
                            "max": int(objects["z_extent"].max()) if len(objects) else None},
               "config": cfg}
    write_json_atomic(summary_path, summary)
    return summary


def check_volume_complete(cfg: dict[str, Any], out_dir: str, out_json: str) -> dict[str, Any]:
    """The last step of a volume run: fine when no block failed. Otherwise (with ``batching.rerun_failed``)
    retire the pass-1 markers of the failed blocks' batches (``*.json.failed``) and fail the run naming the
    blocks: the next run redoes those batches, the edge jobs that read them, the merge and the relabel pass
    (the lookup table changes), as the plate path redoes failed batches (``steps.aggregate.check_complete``)."""
    summary = read_json(os.path.join(out_dir, "summary.json"))
    failed = summary["failed_blocks"]
    if failed and cfg["batching"]["rerun_failed"]:
        for batch in summary["failed_batches"]:
            marker = os.path.join(out_dir, "jobs", "volume_segment", f"{batch}.json")
            if os.path.exists(marker):
                os.replace(marker, marker + ".failed")
        lines = [f"  block {k}: {err}" for k, err in list(failed.items())[:20]]
        raise FailedBlocksError(
            f"{len(failed)} of {summary['grid']['n_blocks']} volume blocks failed (summary.json and report.html "
            "list them):\n" + "\n".join(lines) + ("\n  ..." if len(failed) > 20 else "")
            + f"\nRun the same command again to redo just their batches ({', '.join(summary['failed_batches'])}); "
            "fix the input first if the error is in the data, or set batching.rerun_failed: false to accept "
            "the failures (their blocks stay empty).")
    result = {"n_blocks": summary["grid"]["n_blocks"], "failed": sorted(failed)}
    write_json_atomic(out_json, result)
    return result
