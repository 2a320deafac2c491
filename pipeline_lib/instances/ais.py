"""AIS (micro-sam's automatic instance segmentation) on decoder maps, computed block by block.

Per block (inner region + halo) the maps are smoothed (foreground sigma 1.0, distances sigma 1.6), the
foreground mask is ``fg > t_fg`` and the seeds are connected components of
``(center < t_c) & (boundary < t_b) & mask``. Seeds are labelled globally (per-block labels, compact
offsets, union of components that touch across block faces); the seeded watershed on the smoothed
boundary distance then runs on each block with its halo and global seed ids and writes its inner part.
Small objects are dropped and ids made consecutive with one global lookup table.

Unlike micro-sam's tiled AIS, inputs are never modified (micro-sam smooths the maps in place while still
reading them), so results are reproducible and agree with the untiled result up to the reach of the halo.
With one block this is exactly micro-sam's ``InstanceSegmentationWithDecoder.generate`` (same library
calls, same order).

Option ``keep_unseeded`` (ours, off by default): foreground components that received no seed become objects
of their own. micro-sam's smoothing removes the seeds of small objects, which are then lost entirely.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from itertools import product
from typing import Any, Callable, Sequence

import bioimage_cpp as bic
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..tiling import Block, block_grid


@dataclass
class AISParams:
    center_distance_threshold: float = 0.5
    boundary_distance_threshold: float = 0.5
    foreground_threshold: float = 0.5
    foreground_smoothing: float = 1.0
    distance_smoothing: float = 1.6
    min_size: int = 0
    keep_unseeded: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def smoothing_reach(params: AISParams) -> int:
    """Pixels over which the Gaussians read: a halo below this would make blocks disagree."""
    return int(math.ceil(3 * max(params.foreground_smoothing, params.distance_smoothing, 0))) + 1


def _smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return bic.filters.gaussian_smoothing(x, sigma) if sigma > 0 else x


def block_masks(maps: np.ndarray, p: AISParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(foreground mask, seed mask, watershed heightmap) for maps of shape (3, *spatial)."""
    fg = _smooth(maps[0], p.foreground_smoothing)
    center = _smooth(maps[1], p.distance_smoothing)
    boundary = _smooth(maps[2], p.distance_smoothing)
    fg_mask = fg > p.foreground_threshold
    seeds = (center < p.center_distance_threshold) & (boundary < p.boundary_distance_threshold) & fg_mask
    return fg_mask, seeds, boundary


def ais_single(maps: np.ndarray, p: AISParams) -> np.ndarray:
    """Untiled AIS of one in-memory image (the reference the blockwise version must reproduce)."""
    out = np.zeros(maps.shape[1:], dtype=np.uint32)
    ais_blockwise(maps, out, p, block=maps.shape[1:], halo=0)
    return out


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    lab = bic.segmentation.label(np.ascontiguousarray(mask, dtype=bool))
    return lab, int(lab.max()) if lab.size else 0


def _half_offsets(ndim: int) -> list[tuple[int, ...]]:
    """Neighbour offsets of full connectivity, one of each +/- pair (lexicographically positive)."""
    offs = []
    for d in product((-1, 0, 1), repeat=ndim):
        if any(d) and next(v for v in d if v != 0) > 0:
            offs.append(d)
    return offs


class _GlobalIds:
    """Per-block local labels stored in a scratch array, read back as global ids via block offsets."""

    def __init__(self, scratch: Any, blocks: Sequence[Block], block_shape: Sequence[int]):
        self.scratch = scratch
        self.blocks = blocks
        self.block_shape = tuple(block_shape)
        self.by_index = {b.index: b for b in blocks}
        self.offsets: dict[tuple[int, ...], int] = {}

    def set_counts(self, counts: dict[tuple[int, ...], int], start: int = 0) -> int:
        total = start
        for b in self.blocks:
            self.offsets[b.index] = total
            total += counts[b.index]
        return total

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        """Global ids (0 = none) over ``region``, which may span several blocks."""
        local = np.asarray(self.scratch[region]).astype(np.int64)
        first = [s.start // b for s, b in zip(region, self.block_shape)]
        last = [(s.stop - 1) // b for s, b in zip(region, self.block_shape)]
        for idx in product(*(range(f, l_ + 1) for f, l_ in zip(first, last))):
            blk = self.by_index[idx]
            sub = tuple(slice(max(bi.start, r.start) - r.start, min(bi.stop, r.stop) - r.start)
                        for bi, r in zip(blk.inner, region))
            part = local[sub]
            part[part > 0] += self.offsets[idx]
        return local

    def merge_edges(self, shape: Sequence[int]) -> np.ndarray:
        """(n, 2) pairs of global ids whose pixels touch across block boundaries (full connectivity)."""
        edges = []
        offs = _half_offsets(len(shape))
        for blk in self.blocks:
            region = tuple(slice(s.start, min(s.stop + 1, n)) for s, n in zip(blk.inner, shape))
            if all(s.stop == b.stop for s, b in zip(region, blk.inner)):
                continue  # no neighbour above in any axis
            ids = self.read(region)
            for d in offs:
                src = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(d, ids.shape))
                dst = tuple(slice(s.start + o, s.stop + o) for s, o in zip(src, d))
                a, b = ids[src], ids[dst]
                sel = (a > 0) & (b > 0) & (a != b)
                if sel.any():
                    pairs = np.stack([a[sel], b[sel]], axis=1)
                    edges.append(np.unique(pairs, axis=0))
        return np.concatenate(edges) if edges else np.zeros((0, 2), dtype=np.int64)


def _components(n: int, edges: np.ndarray) -> np.ndarray:
    """Map ids 1..n to consecutive component ids 1..k (order of first id), 0 stays 0."""
    mapping = np.zeros(n + 1, dtype=np.int64)
    if n == 0:
        return mapping
    if len(edges):
        e = edges - 1
        g = coo_matrix((np.ones(len(e), dtype=np.int8), (e[:, 0], e[:, 1])), shape=(n, n))
        _, comp = connected_components(g, directed=False)
    else:
        comp = np.arange(n)
    # renumber components by their smallest member so the order follows the scan order of the seeds
    first = np.full(comp.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, comp, np.arange(n))
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    mapping[1:] = rank[comp] + 1
    return mapping


def ais_blockwise(maps: Any, out: Any, p: AISParams, block: int | Sequence[int],
                  halo: int | Sequence[int], scratch: Any = None,
                  progress: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """AIS over ``maps`` (array-like (3, *spatial), read lazily) into ``out`` (array-like, uint32).

    ``scratch`` is an int64/uint64 array-like of the spatial shape for temporary block labels (numpy when
    None). Memory per step is bounded by one block with its halo. Returns the object statistics
    (``label``, ``area``, ``centroid`` per axis) and the number of objects.
    """
    shape = tuple(out.shape)
    ndim = len(shape)
    block = tuple(block) if not isinstance(block, int) else (block,) * ndim
    block = tuple(min(b, s) for b, s in zip(block, shape))
    halo_t = tuple(halo) if not isinstance(halo, int) else (halo,) * ndim
    reach = smoothing_reach(p)
    halo_t = tuple(max(h, reach) if b < s else 0 for h, b, s in zip(halo_t, block, shape))
    blocks = block_grid(shape, block, halo_t)
    if scratch is None:
        scratch = np.zeros(shape, dtype=np.uint64)
    step = progress or (lambda name, i: None)

    def maps_at(region):
        return np.asarray(maps[(slice(None),) + region], dtype=np.float32)

    # pass 1: local seed labels per block
    seeds = _GlobalIds(scratch, blocks, block)
    counts = {}
    for i, blk in enumerate(blocks):
        _, seed_mask, _ = block_masks(maps_at(blk.outer), p)
        lab, n = _label(seed_mask[blk.inner_local])
        scratch[blk.inner] = lab.astype(np.uint64)
        counts[blk.index] = n
        step("seeds", i)
    n_seeds = seeds.set_counts(counts)
    seed_map = _components(n_seeds, seeds.merge_edges(shape))
    n_ws = int(seed_map.max())

    # pass 2: seeded watershed per block with halo, global seed ids
    sizes = np.zeros(n_ws + 1, dtype=np.int64)
    for i, blk in enumerate(blocks):
        fg_mask, _, hmap = block_masks(maps_at(blk.outer), p)
        markers = seed_map[seeds.read(blk.outer)].astype(np.uint64)
        ws = bic.segmentation.watershed(hmap, markers=markers, mask=fg_mask)[blk.inner_local]
        out[blk.inner] = ws.astype(np.uint32)
        sizes += np.bincount(ws.ravel().astype(np.int64), minlength=n_ws + 1)
        step("watershed", i)

    # optional pass: foreground components without any seed become objects
    n_rescued = 0
    if p.keep_unseeded:
        rest = _GlobalIds(scratch, blocks, block)
        counts = {}
        for i, blk in enumerate(blocks):
            fg_mask, _, _ = block_masks(maps_at(blk.outer), p)
            lab, n = _label(fg_mask[blk.inner_local] & (np.asarray(out[blk.inner]) == 0))
            scratch[blk.inner] = lab.astype(np.uint64)
            counts[blk.index] = n
        n_rest = rest.set_counts(counts)
        rest_map = _components(n_rest, rest.merge_edges(shape))
        n_rescued = int(rest_map.max())
        rest_sizes = np.zeros(n_rescued + 1, dtype=np.int64)
        for blk in blocks:
            ids = rest_map[rest.read(blk.inner)]
            rest_sizes += np.bincount(ids.ravel(), minlength=n_rescued + 1)
        sizes = np.concatenate([sizes, rest_sizes[1:]])

    # global lookup: size filter + consecutive ids (micro-sam drops objects with size < min_size)
    keep = sizes >= max(p.min_size, 1)
    keep[0] = False
    final = np.zeros(len(sizes), dtype=np.int64)
    final[keep] = np.arange(1, int(keep.sum()) + 1)
    n_final = int(keep.sum())
    identity = n_rescued == 0 and n_final == n_ws

    # pass 3: apply the lookup and measure
    area = np.zeros(n_final + 1, dtype=np.int64)
    csum = np.zeros((ndim, n_final + 1), dtype=np.float64)
    for i, blk in enumerate(blocks):
        ids = np.asarray(out[blk.inner]).astype(np.int64)
        if not identity:
            if n_rescued:
                r = rest_map[rest.read(blk.inner)]
                ids = np.where(ids > 0, ids, np.where(r > 0, r + n_ws, 0))
            ids = final[ids]
            out[blk.inner] = ids.astype(np.uint32)
        flat = ids.ravel()
        area += np.bincount(flat, minlength=n_final + 1)
        grids = np.indices(ids.shape)
        for ax in range(ndim):
            csum[ax] += np.bincount(flat, weights=(grids[ax] + blk.inner[ax].start).ravel(),
                                    minlength=n_final + 1)
        step("relabel", i)
    with np.errstate(invalid="ignore", divide="ignore"):
        centroid = csum[:, 1:] / area[1:]
    return {"n_objects": n_final, "label": np.arange(1, n_final + 1), "area": area[1:],
            "centroid": centroid, "n_seeds": n_ws, "n_rescued": int((final[n_ws + 1:] > 0).sum())}
