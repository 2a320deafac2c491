"""Synthetic nucleus volumes of any size, generated lazily block by block (for tests and bench/volume.py).

Space is cut into cells of ``cell`` voxels; each cell holds at most one ellipsoidal nucleus that stays
inside it (neighbours may touch at cell faces). Every cell's nucleus is a pure function of the cell index
(an integer hash), so any block is generated without the rest of the volume. Writes the image, the 3D
ground truth as ``labels/nuclei_gt`` and per-slice 2D oracle decoder maps (what a perfect 2D model would
predict) as a predictions store.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import zarr

from ..embed.oracle import oracle_maps
from ..tiling import block_grid
from . import ngff
from .ngff import create_volume_maps

_M = np.uint64(0xFFFFFFFFFFFFFFFF)


def _hash(x: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 of ``x + salt`` as floats in [0, 1)."""
    with np.errstate(over="ignore"):
        z = (x.astype(np.uint64) + np.uint64(salt) * np.uint64(0x9E3779B97F4A7C15)) & _M
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


def nuclei_labels(region: Sequence[slice], shape: Sequence[int], cell: Sequence[int] = (12, 24, 24),
                  fill: float = 0.8, seed: int = 0) -> np.ndarray:
    """GT labels (uint32, id = cell index + 1) of ``region`` of a volume of ``shape``."""
    cell = np.asarray(cell)
    grids = np.meshgrid(*[np.arange(r.start, r.stop) for r in region], indexing="ij")
    ncell = [-(-s // c) for s, c in zip(shape, cell)]
    ci = [g // c for g, c in zip(grids, cell)]
    lin = (ci[0] * ncell[1] + ci[1]) * ncell[2] + ci[2]
    present = _hash(lin, seed * 7 + 1) < fill
    q = np.zeros(lin.shape)
    for ax in range(3):
        half = cell[ax] / 2
        radius = half * (0.55 + 0.4 * _hash(lin, seed * 7 + 2 + ax))
        slack = half - radius
        center = ci[ax] * cell[ax] + half - 0.5 + slack * (2 * _hash(lin, seed * 7 + 5 + ax) - 1)
        q += ((grids[ax] - center) / radius) ** 2
    inside = present & (q <= 1.0)
    return np.where(inside, lin + 1, 0).astype(np.uint32)


def _image(labels: np.ndarray, region: Sequence[slice], seed: int) -> np.ndarray:
    lin = labels.astype(np.int64)
    bright = np.where(lin > 0, 600 + 1400 * _hash(lin, seed * 7 + 11), 0)
    pos = np.ravel_multi_index(np.meshgrid(*[np.arange(r.start, r.stop) for r in region], indexing="ij"),
                               (1 << 20, 1 << 20, 1 << 20))
    noise = _hash(pos, seed * 7 + 12) - 0.5
    return np.clip(200 + bright * (1 + 0.2 * noise) + 60 * noise, 0, 65535).astype(np.uint16)


def _datasets(axes: str, n_levels: int, voxel: Sequence[float]) -> list[dict]:
    """Levels downsample yx only, as strided picks (level 0's translation holds at every level)."""
    scales = [[1.0 if a == "c" else (voxel[0] if a == "z" else voxel["zyx".index(a)] * 2 ** lvl) for a in axes]
              for lvl in range(n_levels)]
    return ngff.datasets_meta([f"s{lvl}" for lvl in range(n_levels)], scales)


def write_synthetic_volume(path: str | os.PathLike, shape: Sequence[int] = (32, 256, 256),
                           cell: Sequence[int] = (12, 24, 24), predictions: str | None = None,
                           voxel: Sequence[float] = (0.5, 0.25, 0.25), n_levels: int = 2, chunk: int = 256,
                           channel_axis: bool = True, block: Sequence[int] = (16, 512, 512), seed: int = 0,
                           version: str = "0.4") -> dict:
    """Write the volume (czyx or zyx, levels downsample yx only), its GT and optionally oracle maps.

    Memory is bounded by ``block`` (plus one cell of margin for the per-object oracle normalisation).
    """
    shape = tuple(int(s) for s in shape)
    fmt = ngff.zarr_format_of(version)
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    axes = "czyx" if channel_axis else "zyx"
    lead = (1,) if channel_axis else ()
    lg = root.require_group("labels")
    ngff.write_labels_list(lg, ["nuclei_gt"], version)
    gt = lg.require_group("nuclei_gt")
    paths = [f"s{lvl}" for lvl in range(n_levels)]
    shapes = [(shape[0], -(-shape[1] // 2 ** lvl), -(-shape[2] // 2 ** lvl)) for lvl in range(n_levels)]
    chunks = [(1, chunk, chunk)] * n_levels
    imgs = ngff.create_levels(root, paths, [lead + s for s in shapes], [lead + c for c in chunks], "uint16", axes,
                              overwrite=True)
    labs = ngff.create_levels(gt, paths, shapes, chunks, "uint32", "zyx", overwrite=True)
    units = {a: "micrometer" for a in "zyx"}
    omero = ngff.omero_meta(["nuclei"], ["FFFFFF"], [{"start": 0, "end": 2500, "min": 0, "max": 65535}])
    ngff.write_label(gt, version, ngff.axes_meta("zyx", units), _datasets("zyx", n_levels, voxel), "nuclei_gt")
    ngff.write_image(root, version, ngff.axes_meta(axes, units), _datasets(axes, n_levels, voxel), "synthetic_nuclei",
                     omero=omero if channel_axis else None, downsampling=ngff.NEAREST)
    maps = None
    if predictions:
        maps = create_volume_maps(zarr.open_group(predictions, mode="w", zarr_format=fmt), shape, (chunk, chunk),
                                  version)
    margin = max(cell[1:])
    for b in block_grid(shape, block):
        lab = nuclei_labels(b.inner, shape, cell, seed=seed)
        img = _image(lab, b.inner, seed)
        idx = lead and (0,)
        imgs[0][idx + b.inner] = img
        labs[0][b.inner] = lab
        for lvl in range(1, n_levels):
            f = 2 ** lvl
            sub = tuple([b.inner[0]] + [slice(-(-r.start // f), -(-r.stop // f)) for r in b.inner[1:]])
            pick = (slice(None),) + tuple(slice((-(-r.start // f)) * f - r.start, None, f) for r in b.inner[1:])
            imgs[lvl][idx + sub] = img[pick]
            labs[lvl][sub] = lab[pick]
        if maps is not None:
            outer = tuple([b.inner[0]] + [slice(max(r.start - margin, 0), min(r.stop + margin, n))
                                          for r, n in zip(b.inner[1:], shape[1:])])
            big = nuclei_labels(outer, shape, cell, seed=seed)
            inner = tuple(slice(r.start - o.start, r.stop - o.start) for r, o in zip(b.inner[1:], outer[1:]))
            out = np.empty((3,) + lab.shape, np.float16)
            for k in range(big.shape[0]):
                out[(slice(None), k)] = oracle_maps(big[k])[(slice(None),) + inner]
            maps[(slice(None),) + b.inner] = out
    return {"shape": shape, "n_cells": int(np.prod([-(-s // c) for s, c in zip(shape, cell)]))}
