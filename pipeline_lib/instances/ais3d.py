"""AIS on a stack of per-slice decoder maps: per-slice instances whose foreground is decided in 3D.

A 2D model predicts each z-slice on its own. micro-sam's AIS then smooths the foreground map of each slice
(sigma 1.0) and thresholds it: the small first and last slices of a nucleus (its *caps*) and small objects
do not survive the smoothing, so each 3D object loses its caps and its IoU falls below the high mSA
thresholds (GoNuclear, per-slice oracle maps: 0.80 mSA after the merge).

Here the smoothing only *detects* objects, the raw map gives their extent (hysteresis in 3D):

1. core = anisotropic 3D Gaussian of the foreground (sigma ``foreground_smoothing`` in yx,
   ``foreground_smoothing / anisotropy`` in z, anisotropy = z spacing / yx spacing from the NGFF scale)
   above ``foreground_threshold``;
2. foreground = the 3D components (6-connected) of the *raw* ``fg > foreground_threshold`` that hold a
   core voxel or have at least 2 voxels in each of at least two slices. Independent per-slice noise is
   rarely foreground at the same place in two neighbouring slices, so z-consistency replaces the
   smoothing as the noise filter (with strong pixel noise, e.g. sigma 0.2 on the maps, it is not enough:
   bench/volume_accuracy.py, README);
3. per slice, as micro-sam: seeds = 2D components of ``(center < t_c) & (boundary < t_b) & foreground``
   on the 2D-smoothed distance maps (sigma ``distance_smoothing``), seeded watershed on the smoothed
   boundary distance restricted to the foreground; foreground components without a seed always become
   objects (as ``ais.keep_unseeded``, which this step does not read); objects below ``min_size`` pixels
   are dropped.

The 3D identity is left to the slice merge (``stitch.merge3d``), as for any per-slice segmentation. A 3D
watershed from seeds linked through z was tried during development (not kept, not in the bench): seeds of
touching nuclei join through z, and it scored lower after the merge (GoNuclear, oracle maps, before the
merge's one-cut waist rule: 0.980 vs 0.985 mSA).

Blockwise: a block is processed with a z-halo of :func:`z_halo` slices and a yx halo; only the foreground
decision (step 2) reaches beyond a slice, so blocks agree with the whole volume wherever the 3D component
of a voxel that lacks a core fits into the halo.
"""
from __future__ import annotations

import math

import bioimage_cpp as bic
import numpy as np

from .ais import AISParams


def z_halo(p: AISParams, anisotropy: float) -> int:
    """Slices above and below a block that the 3D foreground decision reads (>= 1 for the span test)."""
    return max(1, int(math.ceil(3 * p.foreground_smoothing / max(anisotropy, 1e-6))) + 1)


def _smooth(x: np.ndarray, sigma: tuple[float, ...]) -> np.ndarray:
    """Gaussian with per-axis sigma; axes with sigma < 0.05 are not smoothed."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if max(sigma) < 0.05:
        return x
    if sigma[0] < 0.05:
        return np.stack([bic.filters.gaussian_smoothing(s, sigma[1:]) for s in x]) if len(x) else x
    return bic.filters.gaussian_smoothing(x, tuple(max(s, 1e-3) for s in sigma))


def foreground_3d(fg: np.ndarray, p: AISParams, anisotropy: float = 1.0) -> np.ndarray:
    """(Z, Y, X) bool foreground: raw components that hold a smoothed core or span >= 2 slices."""
    fs = p.foreground_smoothing
    core = _smooth(fg, (fs / max(anisotropy, 1e-6), fs, fs)) > p.foreground_threshold
    comp = bic.segmentation.label(np.ascontiguousarray(fg > p.foreground_threshold), connectivity=1)
    comp = comp.astype(np.int64)
    n = int(comp.max()) if comp.size else 0
    if n == 0:
        return comp > 0
    ok = np.zeros(n + 1, bool)
    ok[comp[core]] = True
    zs = np.broadcast_to(np.arange(comp.shape[0])[:, None, None], comp.shape)
    sel = comp > 0
    # voxels per (component, slice); a component without a core needs >= 2 voxels in >= 2 slices: chance
    # pairs of noise voxels in neighbouring slices are single voxels
    key, per_slice = np.unique(comp[sel] * comp.shape[0] + zs[sel], return_counts=True)
    ok |= np.bincount(key // comp.shape[0], weights=per_slice >= 2, minlength=n + 1) >= 2
    ok[0] = False
    return ok[comp]


def _slice_instances(fg: np.ndarray, center: np.ndarray, boundary: np.ndarray, p: AISParams) -> np.ndarray:
    """One slice: seeded watershed in the given foreground, unseeded components kept, size filter."""
    seeds = bic.segmentation.label((center < p.center_distance_threshold) &
                                   (boundary < p.boundary_distance_threshold) & fg)
    ws = bic.segmentation.watershed(boundary, markers=seeds, mask=fg).astype(np.int64)
    n = int(ws.max())
    rest = bic.segmentation.label(fg & (ws == 0)).astype(np.int64)
    ws = np.where(rest > 0, rest + n, ws)
    sizes = np.bincount(ws.ravel())
    keep = sizes >= max(p.min_size, 1)
    keep[0] = False
    final = np.zeros(len(sizes), np.int64)
    final[keep] = np.arange(1, int(keep.sum()) + 1)
    return final[ws]


def ais_stack(maps: np.ndarray, p: AISParams, anisotropy: float = 1.0) -> np.ndarray:
    """(Z, Y, X) uint32 per-slice instances (ids 1..n in every slice) of maps (3, Z, Y, X)."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 4 or maps.shape[0] != 3:
        raise ValueError(f"expected maps of shape (3, Z, Y, X), got {maps.shape}")
    fg = foreground_3d(maps[0], p, anisotropy)
    ds = (0.0, p.distance_smoothing, p.distance_smoothing)  # per slice, as the 2D model predicted them
    center, boundary = _smooth(maps[1], ds), _smooth(maps[2], ds)
    out = np.zeros(maps.shape[1:], np.uint32)
    for z in range(maps.shape[1]):
        out[z] = _slice_instances(fg[z], center[z], boundary[z], p)
    return out
