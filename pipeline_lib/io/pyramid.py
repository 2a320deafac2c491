"""Label pyramids: each level is nearest-neighbour sampled from the level above, block by block."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import zarr

from ..tiling import block_grid


def _indices(n_src: int, n_dst: int, ratio: float) -> np.ndarray:
    idx = np.floor(np.arange(n_dst) * ratio).astype(np.int64)
    return np.clip(idx, 0, n_src - 1)


def downsample_level(src: zarr.Array, dst: zarr.Array, ratios: Sequence[float], block: int = 1024) -> None:
    """Fill ``dst`` with ``src`` sampled at ``floor(i * ratio)`` per axis, one dst block at a time."""
    idx = [_indices(s, d, r) for s, d, r in zip(src.shape, dst.shape, ratios)]
    bshape = tuple(max(c, min(block, n)) // c * c for c, n in zip(dst.chunks, dst.shape))
    for b in block_grid(dst.shape, bshape):
        sub = [i[s] for i, s in zip(idx, b.inner)]
        region = tuple(slice(int(s[0]), int(s[-1]) + 1) for s in sub)
        data = np.asarray(src[region])
        local = np.ix_(*[s - r.start for s, r in zip(sub, region)])
        dst[b.inner] = data[local]


def build_pyramid(group: zarr.Group, paths: Sequence[str], scales: Sequence[Sequence[float]]) -> None:
    """Levels 1.. of a label image from level 0, using the ratio of consecutive scale transforms."""
    for k in range(1, len(paths)):
        ratios = [b / a if a else 1.0 for a, b in zip(scales[k - 1], scales[k])]
        downsample_level(group[paths[k - 1]], group[paths[k]], ratios)


def downsample_region(level0: Any, levels: Sequence[Any], ratios0: Sequence[Sequence[float]],
                      region0: Sequence[slice], block: int = 1024) -> None:
    """Fill the part of each coarser level that samples ``region0`` of level 0 (nearest, ``floor(i * R)``).

    ``ratios0[k]`` is the scale of ``levels[k]`` over level 0 per axis. Disjoint regions of level 0 own
    disjoint parts of every level, so jobs that each own a slab can build their part concurrently.
    Arrays are (z, y, x) views; work goes slice by slice in yx blocks, so memory stays bounded.
    """
    for dst, ratios in zip(levels, ratios0):
        idx = [_indices(s, d, r) for s, d, r in zip(level0.shape, dst.shape, ratios)]
        owned = []
        for r, ratio, n in zip(region0, ratios, dst.shape):
            lo, hi = math.ceil(r.start / ratio - 1e-9), math.ceil(r.stop / ratio - 1e-9)
            owned.append(slice(min(lo, n), min(hi, n)))
        if any(s.start >= s.stop for s in owned):
            continue
        y0, x0 = owned[1].start, owned[2].start
        for z in range(owned[0].start, owned[0].stop):
            for b in block_grid((owned[1].stop - y0, owned[2].stop - x0), block):
                ys = slice(b.inner[0].start + y0, b.inner[0].stop + y0)
                xs = slice(b.inner[1].start + x0, b.inner[1].stop + x0)
                iy, ix = idx[1][ys], idx[2][xs]
                src = np.asarray(level0[int(idx[0][z]), int(iy[0]):int(iy[-1]) + 1, int(ix[0]):int(ix[-1]) + 1])
                dst[z, ys, xs] = src[np.ix_(iy - iy[0], ix - ix[0])]
