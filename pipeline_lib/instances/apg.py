"""APG and AMG for one 2D field: prompts -> candidate masks (decoded per tile) -> mask NMS -> labels.

Prompts come from the whole field; each belongs to the tile whose inner region contains it and is decoded
against that tile's embedding over the tile plus halo, so an object near a tile edge is segmented whole.
Duplicates from neighbouring tiles meet in the same field-wide sparse NMS, so tiles leave no seams.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..tiling import Block, grid_shape
from .nms import Candidates, mask_nms, paint
from .prompts import apg_points, grid_points

# decode(tile index per prompt, (N, 2) y/x field coordinates) -> candidate masks
Decode = Callable[[np.ndarray, np.ndarray], Candidates]
# assemble(candidates, scores, nms_threshold, min_size, drop_largest) -> labels: :func:`assemble` here, or one
# that keeps the candidates on the decoder's device (``embed.device_masks.assemble``)
Assemble = Callable[..., np.ndarray]


@dataclass(frozen=True)
class APGParams:
    """micro-sam's ``AutomaticPromptGenerator.generate`` defaults (Archit & Pape, MIDL 2026)."""

    foreground_threshold: float = 0.5
    center_distance_threshold: float = 0.5
    boundary_distance_threshold: float = 0.5
    min_size: int = 25
    nms_threshold: float = 0.9


@dataclass(frozen=True)
class AMGParams:
    """SAM's automatic mask generator; thresholds default to micro-sam's per-model values."""

    points_per_side: int = 32
    pred_iou_threshold: float = 0.88
    stability_score_threshold: float = 0.95
    nms_threshold: float = 0.7
    min_size: int = 0
    remove_background: bool = True


def tile_of_points(points: np.ndarray, shape: Sequence[int], tile: int) -> np.ndarray:
    """Index (C order, as ``block_grid``) of the tile whose inner region contains each y/x point."""
    gy, gx = grid_shape(shape, tile)
    p = np.floor(np.asarray(points, np.float64)).astype(np.int64)
    ty = np.minimum(p[:, 0] // tile, gy - 1)
    tx = np.minimum(p[:, 1] // tile, gx - 1)
    return ty * gx + tx


def assemble(cand: Candidates, scores: np.ndarray, nms_threshold: float, min_size: int,
             drop_largest: bool = False) -> np.ndarray:
    """NMS, then paint the kept masks largest first (ties: NMS order) into uint32 labels."""
    keep = mask_nms(cand, scores, nms_threshold)
    order = keep[np.argsort(-cand.area[keep], kind="stable")]
    return paint(cand, order, min_size, drop_largest)


def apg_segment(maps: np.ndarray, tile: int, decode: Decode, p: APGParams = APGParams(),
                assemble: Assemble = assemble) -> tuple[np.ndarray, dict]:
    """APG labels for one field from its decoder maps (3, Y, X); ``decode`` predicts masks per tile."""
    shape = maps.shape[1:]
    pts = apg_points(maps, p.foreground_threshold, p.center_distance_threshold, p.boundary_distance_threshold)
    cand = decode(tile_of_points(pts, shape, tile), pts)
    cand = cand.subset(cand.area > p.min_size)
    labels = assemble(cand, cand.iou * cand.stability, p.nms_threshold, p.min_size)
    return labels, {"n_prompts": int(len(pts)), "n_candidates": int(len(cand))}


def amg_points(blocks: Sequence[Block], points_per_side: int) -> tuple[np.ndarray, np.ndarray]:
    """SAM's point grid over the inner region of every tile: (tile index, y/x field coordinates)."""
    tiles, pts = [], []
    for k, b in enumerate(blocks):
        g = grid_points(b.inner_shape, points_per_side) + [b.inner[0].start, b.inner[1].start]
        pts.append(g)
        tiles.append(np.full(len(g), k, np.int64))
    return np.concatenate(tiles), np.concatenate(pts)


def amg_segment(shape: Sequence[int], blocks: Sequence[Block], decode: Decode,
                p: AMGParams = AMGParams(), assemble: Assemble = assemble) -> tuple[np.ndarray, dict]:
    """AMG labels for one field (models without a decoder): grid prompts, 3 masks each, filters, NMS."""
    tiles, pts = amg_points(blocks, p.points_per_side)
    cand = decode(tiles, pts)
    ok = (cand.iou > p.pred_iou_threshold) & (cand.stability >= p.stability_score_threshold) & (cand.area > 0)
    cand = cand.subset(ok)
    labels = assemble(cand, cand.iou, p.nms_threshold, p.min_size, p.remove_background)
    return labels, {"n_prompts": int(len(pts)), "n_candidates": int(len(cand))}
