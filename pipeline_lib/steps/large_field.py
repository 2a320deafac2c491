"""APG / AMG of a field too large to hold in memory (a whole-slide image, an EM section), block by block.

A field larger than ``tiling.field_block`` in y or x is cut into blocks of that size with a halo of
``tiling.field_halo``; each block is segmented as a small field (its tiles embedded, decoder maps, prompts
decoded, mask NMS, painted) over its inner region plus halo, and the blocks are stitched by halo-overlap
agreement (:func:`stitch.blockwise.segment_blockwise`). Memory is bounded by one block (its embeddings,
maps and candidates) plus about one row of blocks' halo strips; the pieces, labels and maps are written to
zarr per block. Within a block the result is what the in-memory path gives for that crop; objects within
``field_halo`` of a block seam see less context than in the whole field, which is where the two paths may
differ (the tests measure it: mSA >= 0.99 with a decoder whose masks depend only on local content).
"""
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

from ..embed.predict import FieldTask, embed_prepared, field_value_range, prepare_field
from ..io.ome_zarr import Plane2D, Plane2DView, create_predictions_image, open_field, read_region
from ..methods import get_method
from ..stitch.blockwise import block_grid_2d, segment_blockwise
from .segment import _label_group, _tmp_root, finish_labels, label_table


def is_large(cfg: dict[str, Any], shape: tuple[int, ...]) -> bool:
    """Whether a field of this (Y, X) shape goes through the blockwise path."""
    return max(int(s) for s in shape[-2:]) > cfg["tiling"]["field_block"]


def _maps_region(path: str, region: tuple[slice, slice]) -> np.ndarray:
    arr = zarr.open_array(os.path.join(path, "0"), mode="r")
    return read_region(arr, (slice(None),) + region, f"{path}/0", region).astype(np.float32)


def segment_large_field(cfg: dict[str, Any], plan: dict[str, Any], f: dict[str, Any], model, decoder,
                        clock=None) -> tuple[dict[str, Any], pd.DataFrame]:
    """Labels (and, for APG without ``predictions``, the decoder maps) of one large field, written block by
    block; returns (status info, object table) as the in-memory path does."""
    from .prompt_segment import prompt_labels
    t0 = time.time()
    img = open_field(plan["input"], f["path"])
    plane = Plane2D(img, img.channel_index(cfg["channel"]))
    shape = tuple(plane.shape)
    tile, halo = cfg["tiling"]["tile"], cfg["tiling"]["halo"]
    spec = get_method(cfg)
    run_decoder = spec.needs_decoder(cfg)
    read_maps = spec.store is not None and not run_decoder  # e.g. APG on given maps
    vr = field_value_range(plane) if cfg["encoder"]["normalization"] == "field" else None
    maps_out = None
    if run_decoder:
        group = zarr.open_group(f["predictions"], mode="a", zarr_format=plan["zarr_format"])
        maps_out = create_predictions_image(group, shape, (tile, tile), plan["version"])
    stats = {"n_prompts": 0, "n_candidates": 0}

    def block_labels(b) -> np.ndarray:
        task = FieldTask(f["key"], np.asarray(plane[b.outer]), None, vr)
        tiles = prepare_field(task, tile, halo)
        emb, maps = embed_prepared(model, tiles, cfg["encoder"]["batch_size"], cfg["encoder"]["precision"],
                                   with_maps=run_decoder, clock=clock)
        if read_maps:
            maps = _maps_region(f["predictions"], b.outer)
        if maps_out is not None:
            maps_out[(slice(None),) + b.inner] = maps[(slice(None),) + b.inner_local].astype(np.float16)
        labels, info = prompt_labels(cfg, decoder, [t.block for t in tiles], emb, maps, b.outer_shape, tile, clock)
        for k in stats:
            stats[k] += int(info.get(k, 0))
        return labels

    lab_img, group = _label_group(cfg, plan, f)
    out = Plane2DView(group[lab_img.datasets[0]["path"]])
    grid = block_grid_2d(shape, cfg["tiling"]["field_block"], cfg["tiling"]["field_halo"])
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(dir=_tmp_root(cfg), prefix=f"{f['key']}."))
        scratch = zarr.create_array(os.path.join(tmp, "pieces.zarr"), shape=shape, dtype="uint32",
                                    chunks=(tile, tile), fill_value=0)
        bar = stack.enter_context(tqdm(total=2 * grid.n_tiles, desc=f"  {cfg['method']} {f['key']}",
                                       unit="block", leave=False, file=sys.stderr))
        res = segment_blockwise(shape, out, block_labels, cfg["tiling"]["field_block"], cfg["tiling"]["field_halo"],
                                scratch, cfg["tiling"]["field_match_threshold"],
                                progress=lambda name, i: bar.update())
    finish_labels(lab_img, group, res["label"])
    table = label_table(f, res["label"], res["area"], res["centroid"])
    info = {"status": "ok" if res["n_objects"] else "empty", "n_objects": res["n_objects"], **stats,
            "n_blocks": res["n_blocks"], "n_joins": res["n_joins"], "seconds": round(time.time() - t0, 3)}
    return info, table
