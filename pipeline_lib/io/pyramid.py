"""Label pyramids: each level is nearest-neighbour sampled from the level above, block by block."""
from __future__ import annotations

from typing import Sequence

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
