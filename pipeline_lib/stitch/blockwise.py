"""2D instance segmentation of any size: blocks with a halo, stitched by halo-overlap agreement.

One engine for every 2D method whose instance step cannot run on the whole image at once (APG/AMG on a
whole-slide image, cellpose's dynamics): a per-block function segments one block over its inner region plus
halo; the block keeps the labels of its inner region (*pieces*) and of its halo (*ring*) as the volume path
does (``stitch.tile_match.split_unit``); pieces of neighbouring blocks are the same object when their IoU
over the halo band reaches ``match_threshold`` (``stitch.tile_match.band_matches``); the union of those
matches gives the objects, with ids made global and consecutive by compact per-block offsets.

Memory is bounded by the block, not by the image: blocks run in raster order, the two blocks of a seam are
matched as soon as both are done, and a block's halo strips are dropped once all its neighbours are done,
so at most about one row of blocks' strips is held. The pieces live in ``scratch`` (a zarr array on disk
for large images). With a halo of at least the largest object diameter, every object is seen whole by the
block that owns most of it.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..instances.ais import _components
from ..tiling import Block
from .tile_match import band_matches, intersect, local, split_unit
from .volume_grid import VolumeGrid

#: labels (any int dtype, 0 = background) of one block's outer region (``block.outer``)
BlockLabels = Callable[[Block], np.ndarray]


def block_grid_2d(shape: tuple[int, int], block: int, halo: int) -> VolumeGrid:
    """The blocks of a (Y, X) image: ``block`` x ``block`` inner regions with ``halo`` (at most ``block``)."""
    return VolumeGrid((1,) + tuple(int(s) for s in shape), tile=int(min(block, max(shape))), halo=int(halo),
                      z_block=1)


class _Seams:
    """Halo strips of finished blocks and the piece pairs joined across their seams."""

    def __init__(self, grid: VolumeGrid, scratch: Any, threshold: float):
        self.grid, self.scratch, self.threshold = grid, scratch, threshold
        self.strips: dict[tuple[int, int], np.ndarray] = {}
        self.done = np.zeros(grid.n_tiles, bool)
        self.counts = np.zeros(grid.n_tiles, np.int64)
        self.pairs: list[np.ndarray] = []  # (k, 4): block a, piece of a, block b, piece of b

    def add(self, t: int, ring: np.ndarray, n: int) -> None:
        g, tile = self.grid, self.grid.tiles[t]
        self.counts[t] = n
        for j in g.neighbours(t):
            reg = intersect(tile.outer, g.tiles[j].inner)
            if reg is not None:
                self.strips[t, j] = ring[local(reg, tile.outer)]
        self.done[t] = True
        for j in g.neighbours(t):
            if self.done[j]:
                self._match(min(t, j), max(t, j))
        for k in [t] + g.neighbours(t):
            if self.done[k] and all(self.done[j] for j in g.neighbours(k)):
                for j in g.neighbours(k):
                    self.strips.pop((k, j), None)

    def _match(self, i: int, j: int) -> None:
        a, b = self.grid.tiles[i], self.grid.tiles[j]
        reg_b, reg_a = intersect(a.outer, b.inner), intersect(b.outer, a.inner)
        if reg_a is None or reg_b is None:
            return
        view_a = np.concatenate([self.strips[i, j].ravel(), np.asarray(self.scratch[reg_a]).ravel()])
        view_b = np.concatenate([np.asarray(self.scratch[reg_b]).ravel(), self.strips[j, i].ravel()])
        m = band_matches(view_a, view_b, int(self.counts[i]), int(self.counts[j]), self.threshold)
        if len(m):
            self.pairs.append(np.stack([np.full(len(m), i), m[:, 0], np.full(len(m), j), m[:, 1]], axis=1))

    def global_pairs(self, off: np.ndarray) -> np.ndarray:
        if not self.pairs:
            return np.zeros((0, 2), np.int64)
        p = np.concatenate(self.pairs)
        return np.stack([off[p[:, 0]] + p[:, 1], off[p[:, 2]] + p[:, 3]], axis=1)


def _accumulate(lab: np.ndarray, origin: tuple[int, int], area: np.ndarray, csum: np.ndarray) -> None:
    """Add one block's pixel counts and coordinate sums per id (work per block, not per object)."""
    ids, inv = np.unique(lab.ravel(), return_inverse=True)
    yy, xx = np.indices(lab.shape)
    area[ids] += np.bincount(inv, minlength=len(ids))
    csum[0, ids] += np.bincount(inv, weights=(yy + origin[0]).ravel(), minlength=len(ids))
    csum[1, ids] += np.bincount(inv, weights=(xx + origin[1]).ravel(), minlength=len(ids))


def segment_blockwise(shape: tuple[int, int], out: Any, block_labels: BlockLabels, block: int, halo: int,
                      scratch: Any = None, match_threshold: float = 0.5,
                      progress: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Labels of a (Y, X) image into ``out`` (array-like, uint32), one block with its halo at a time.

    ``block_labels(block)`` segments one block over ``block.outer``; ``scratch`` (uint32 array-like of the
    image's shape) holds the per-block pieces, numpy if None. ``progress(pass, block index)`` is called
    after each block of the segment and the relabel pass. Returns the counts and, per final object (ids
    1..n), its area and centroid (y, x), as ``instances.ais.ais_blockwise`` does.
    """
    grid = block_grid_2d(shape, block, halo)
    if scratch is None:
        scratch = np.zeros(tuple(shape), np.uint32)
    seams = _Seams(grid, scratch, match_threshold)
    for t, tile in enumerate(grid.tiles):
        lab = np.asarray(block_labels(tile))
        if lab.shape != tile.outer_shape:
            raise ValueError(f"block {t}: labels of shape {lab.shape}, expected {tile.outer_shape}")
        pieces, ring, n = split_unit(lab, tile.inner_local)
        scratch[tile.inner] = pieces
        seams.add(t, ring, n)
        if progress:
            progress("segment", t)
    counts = seams.counts
    off = np.concatenate([[0], np.cumsum(counts)[:-1]])
    n = int(counts.sum())
    pairs = seams.global_pairs(off)
    final = _components(n, pairs)  # pieces 1..n -> consecutive objects, in the order of the blocks
    k = int(final.max()) if n else 0
    area = np.zeros(k + 1, np.int64)
    csum = np.zeros((2, k + 1), np.float64)
    for t, tile in enumerate(grid.tiles):
        ids = np.asarray(scratch[tile.inner]).astype(np.int64)
        lab = np.where(ids > 0, final[np.where(ids > 0, ids + off[t], 0)], 0)
        out[tile.inner] = lab.astype(np.uint32)
        _accumulate(lab, (tile.inner[0].start, tile.inner[1].start), area, csum)
        if progress:
            progress("relabel", t)
    with np.errstate(invalid="ignore", divide="ignore"):
        centroid = csum[:, 1:] / area[1:]
    return {"n_objects": k, "label": np.arange(1, k + 1), "area": area[1:], "centroid": centroid,
            "n_pieces": n, "n_joins": int(len(pairs)), "n_blocks": grid.n_tiles}
