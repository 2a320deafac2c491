"""Cellpose flows -> instance labels block by block, stitched across blocks by halo-overlap matching.

Each block is segmented with its halo by a per-block function (cellpose's own ``dynamics`` in
``embed.cellpose_dynamics``: it needs torch, so it is injected here and this module stays numpy-only). A
block keeps the labels of its inner region (*pieces*) and of its halo (*ring*), as the volume path does
(``stitch.tile_match.split_unit``); pieces of neighbouring blocks are the same object when their IoU over the
halo band reaches ``match_threshold`` (``stitch.tile_match.band_matches``), the union of those matches gives
the objects, and ids are made global and consecutive with compact per-block offsets. With a halo of at least
the largest object diameter every object is seen whole by the block that owns its pixels.

Unlike cellpose's distributed mode (which merges labels that touch across block faces, and in 2D merges
nothing), objects are joined by agreement, not by contact. Cellpose's dynamics are not translation-invariant
(its interpolation grid depends on the window size), so blocks differ from the untiled result by a few
boundary pixels; the test measures it (mSA >= 0.99 against the whole-image ``compute_masks``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from ..stitch.tile_match import band_matches, intersect, local, split_unit
from ..stitch.volume_grid import VolumeGrid
from .ais import _components


@dataclass
class FlowParams:
    """cellpose 4.2's ``CellposeModel.eval`` defaults for the flows -> masks step."""

    cellprob_threshold: float = 0.0
    flow_threshold: float = 0.4
    niter: int | None = None  # None: cellpose's default, 200 (scaled by diameter / 30 when diameter is set)
    min_size: int = 15
    max_size_fraction: float = 0.4
    diameter: float | None = None

    def n_iter(self) -> int:
        """Euler steps as ``CellposeModel.eval`` chooses them (``int(200 / (30 / diameter))``)."""
        if self.niter:
            return int(self.niter)
        return int(200 / (30.0 / self.diameter)) if self.diameter and self.diameter > 0 else 200

    def to_dict(self) -> dict:
        return asdict(self)


BlockMasks = Callable[[np.ndarray], np.ndarray]  # (3, h, w) float32 flows -> (h, w) labels (0 = background)


def _segment_blocks(flows: Any, grid: VolumeGrid, block_masks: BlockMasks, scratch: Any
                    ) -> tuple[np.ndarray, dict[tuple[int, int], np.ndarray]]:
    """Pass 1: per block, pieces into ``scratch`` (local ids 1..n) and the ring strips facing each neighbour."""
    counts = np.zeros(grid.n_tiles, np.int64)
    strips: dict[tuple[int, int], np.ndarray] = {}
    for t, tile in enumerate(grid.tiles):
        lab = block_masks(np.asarray(flows[(slice(None),) + tile.outer], dtype=np.float32))
        pieces, ring, counts[t] = split_unit(lab, tile.inner_local)
        scratch[tile.inner] = pieces
        for j in grid.neighbours(t):
            reg = intersect(tile.outer, grid.tiles[j].inner)
            if reg is not None:
                strips[t, j] = ring[local(reg, tile.outer)]
    return counts, strips


def _matches(grid: VolumeGrid, scratch: Any, counts: np.ndarray, off: np.ndarray,
             strips: dict[tuple[int, int], np.ndarray], threshold: float) -> np.ndarray:
    """Pass 2: global id pairs of pieces joined across block seams (as ``steps.volume_stitch`` per slice)."""
    out = []
    for i, j in grid.neighbour_pairs():
        a, b = grid.tiles[i], grid.tiles[j]
        reg_b, reg_a = intersect(a.outer, b.inner), intersect(b.outer, a.inner)
        if reg_a is None or reg_b is None:
            continue
        view_a = np.concatenate([strips[i, j].ravel(), np.asarray(scratch[reg_a]).ravel()])
        view_b = np.concatenate([np.asarray(scratch[reg_b]).ravel(), strips[j, i].ravel()])
        m = band_matches(view_a, view_b, int(counts[i]), int(counts[j]), threshold)
        if len(m):
            out.append(np.stack([m[:, 0] + off[i], m[:, 1] + off[j]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def flows_blockwise(flows: Any, out: Any, block_masks: BlockMasks, block: int, halo: int,
                    scratch: Any = None, match_threshold: float = 0.5) -> dict[str, Any]:
    """Labels of ``flows`` (array-like (3, Y, X): dY, dX, cellprob) into ``out`` (array-like (Y, X), uint32).

    ``block_masks`` segments one block with its halo; ``halo`` should be at least the largest object
    diameter. ``scratch`` (uint32 array-like of the field's shape) holds the per-block pieces; numpy if None.
    Memory per step: one block with its halo, plus the halo strips of all blocks. Returns counts.
    """
    shape = tuple(out.shape)
    grid = VolumeGrid((1,) + shape, tile=int(min(block, max(shape))), halo=int(halo), z_block=1)
    if scratch is None:
        scratch = np.zeros(shape, np.uint32)
    counts, strips = _segment_blocks(flows, grid, block_masks, scratch)
    off = np.concatenate([[0], np.cumsum(counts)[:-1]])
    n = int(counts.sum())
    pairs = _matches(grid, scratch, counts, off, strips, match_threshold)
    final = _components(n, pairs)  # ids 1..n -> consecutive objects, in the order of the blocks
    for t, tile in enumerate(grid.tiles):
        ids = np.asarray(scratch[tile.inner]).astype(np.int64)
        out[tile.inner] = np.where(ids > 0, final[np.where(ids > 0, ids + off[t], 0)], 0).astype(np.uint32)
    return {"n_objects": int(final.max()) if n else 0, "n_pieces": n, "n_joins": int(len(pairs)),
            "n_blocks": grid.n_tiles}


def oracle_flows(labels: np.ndarray, flows_unit: np.ndarray, cellprob: float = 10.0) -> np.ndarray:
    """(3, Y, X) float32 network-like outputs from a label image and its unit flows (cellpose's
    ``masks_to_flows``): flows x 5 (cellpose trains its network on ``5 * flows``, ``train._loss_fn_seg``) and
    a cell-probability logit of +``cellprob`` inside objects, -``cellprob`` outside."""
    out = np.empty((3,) + labels.shape, np.float32)
    out[:2] = 5.0 * flows_unit
    out[2] = np.where(labels > 0, cellprob, -cellprob)
    return out
