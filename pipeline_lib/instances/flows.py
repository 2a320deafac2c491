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
boundary pixels; the test measures it (mSA >= 0.99 against the whole-image ``compute_masks``). With
``cellpose.exact`` (``embed.cellpose_exact``) blocks are identical to the untiled result of that variant.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from ..stitch.blockwise import segment_blockwise


@dataclass
class FlowParams:
    """cellpose 4.2's ``CellposeModel.eval`` defaults for the flows -> masks step."""

    cellprob_threshold: float = 0.0
    flow_threshold: float = 0.4
    niter: int | None = None  # None: cellpose's default, 200 (scaled by diameter / 30 when diameter is set)
    min_size: int = 15
    max_size_fraction: float = 0.4
    diameter: float | None = None
    exact: bool = False  # blockwise-exact variant (embed.cellpose_exact): blockwise == untiled

    def n_iter(self) -> int:
        """Euler steps as ``CellposeModel.eval`` chooses them (``int(200 / (30 / diameter))``)."""
        if self.niter:
            return int(self.niter)
        return int(200 / (30.0 / self.diameter)) if self.diameter and self.diameter > 0 else 200

    def to_dict(self) -> dict:
        return asdict(self)


BlockMasks = Callable[[np.ndarray], np.ndarray]  # (3, h, w) float32 flows -> (h, w) labels (0 = background)


def flows_blockwise(flows: Any, out: Any, block_masks: BlockMasks, block: int, halo: int,
                    scratch: Any = None, match_threshold: float = 0.5) -> dict[str, Any]:
    """Labels of ``flows`` (array-like (3, Y, X): dY, dX, cellprob) into ``out`` (array-like (Y, X), uint32).

    ``block_masks`` segments one block with its halo; ``halo`` should be at least the largest object
    diameter. ``scratch`` (uint32 array-like of the field's shape) holds the per-block pieces; numpy if None.
    The blocks run through :func:`stitch.blockwise.segment_blockwise` (memory: one block with its halo plus
    about one row of blocks' halo strips). Returns counts, and area and centroid per object.
    """
    return segment_blockwise(tuple(out.shape), out,
                             lambda b: block_masks(np.asarray(flows[(slice(None),) + b.outer], dtype=np.float32)),
                             block, halo, scratch, match_threshold)


def drop_large(out: Any, res: dict[str, Any], fraction: float, block: int = 1024) -> dict[str, Any]:
    """Remove from ``out`` (stitched labels 1..n, array-like (Y, X)) the objects larger than ``fraction`` of
    the field, as cellpose's ``max_size_fraction`` does per image, and renumber; ``res`` is the stitching's
    result (its ``area`` per object), returned updated. Used by ``cellpose.exact``, where the rule is
    field-wide (the same for every block); a pass over ``out`` only when some object is that large."""
    area = np.asarray(res["area"])
    big = area > fraction * float(np.prod(out.shape))
    if not big.any():
        return res
    keep = ~big
    lut = np.zeros(len(area) + 1, np.uint32)
    lut[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    for y in range(0, out.shape[0], block):
        for x in range(0, out.shape[1], block):
            reg = (slice(y, min(y + block, out.shape[0])), slice(x, min(x + block, out.shape[1])))
            out[reg] = lut[np.asarray(out[reg])]
    k = int(keep.sum())
    return {**res, "n_objects": k, "label": np.arange(1, k + 1), "area": area[keep],
            "centroid": np.asarray(res["centroid"])[:, keep], "n_large_removed": int(big.sum())}


def oracle_flows(labels: np.ndarray, flows_unit: np.ndarray, cellprob: float = 10.0) -> np.ndarray:
    """(3, Y, X) float32 network-like outputs from a label image and its unit flows (cellpose's
    ``masks_to_flows``): flows x 5 (cellpose trains its network on ``5 * flows``, ``train._loss_fn_seg``) and
    a cell-probability logit of +``cellprob`` inside objects, -``cellprob`` outside."""
    out = np.empty((3,) + labels.shape, np.float32)
    out[:2] = 5.0 * flows_unit
    out[2] = np.where(labels > 0, cellprob, -cellprob)
    return out
