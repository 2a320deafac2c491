"""Cellpose's own flows -> masks (``cellpose.dynamics``, torch), untiled and block by block.

``cellpose.dynamics`` runs its Euler integration with ``torch.grid_sample`` and its seed search in torch,
so it cannot live in the torch-free ``instances`` package: this module supplies the per-block function and
``instances.flows.flows_blockwise`` does the blocking and stitching (numpy only). The per-block call is
exactly what ``CellposeModel.eval`` runs on a whole 2D image (``resize_and_compute_masks`` with its
``niter``, thresholds, ``min_size`` and ``max_size_fraction``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..instances.flows import FlowParams, flows_blockwise


def cellpose_masks(flows: np.ndarray, params: FlowParams, device: str | torch.device = "cpu") -> np.ndarray:
    """Labels (uint32, consecutive) of one in-memory (3, Y, X) flow field, as ``CellposeModel.eval`` makes
    them from its network outputs (``dP = flows[:2]``, ``cellprob = flows[2]``)."""
    from cellpose import dynamics
    flows = np.asarray(flows, dtype=np.float32)
    masks = dynamics.resize_and_compute_masks(
        flows[:2], flows[2], niter=params.n_iter(), cellprob_threshold=params.cellprob_threshold,
        flow_threshold=params.flow_threshold, min_size=params.min_size,
        max_size_fraction=params.max_size_fraction, device=torch.device(device))
    return np.asarray(masks).astype(np.uint32)


def masks_blockwise(flows: Any, out: Any, params: FlowParams, block: int = 1024, halo: int = 64,
                    device: str | torch.device = "cpu", scratch: Any = None,
                    match_threshold: float = 0.5) -> dict[str, Any]:
    """Cellpose masks of ``flows`` (array-like (3, Y, X), e.g. a predictions zarr) into ``out`` (uint32
    array-like (Y, X)), ``block`` x ``block`` at a time with ``halo`` (>= the largest object diameter)."""
    return flows_blockwise(flows, out, lambda f: cellpose_masks(f, params, device), block, halo, scratch,
                           match_threshold)
