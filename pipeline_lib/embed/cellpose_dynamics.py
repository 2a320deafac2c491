"""Cellpose's own flows -> masks (``cellpose.dynamics``, torch), untiled and block by block.

``cellpose.dynamics`` runs its Euler integration with ``torch.grid_sample`` and its seed search in torch,
so it cannot live in the torch-free ``instances`` package: this module supplies the per-block function and
``instances.flows.flows_blockwise`` does the blocking and stitching (numpy only). The per-block call is
exactly what ``CellposeModel.eval`` runs on a whole 2D image (``resize_and_compute_masks`` with its
``niter``, thresholds, ``min_size`` and ``max_size_fraction``). With ``FlowParams.exact`` (``cellpose.exact``)
both run the blockwise-exact variant of ``embed.cellpose_exact`` instead, whose blocks equal its untiled
result.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..instances.flows import FlowParams, drop_large, flows_blockwise
from ..stitch.blockwise import segment_blockwise


def cellpose_masks(flows: np.ndarray, params: FlowParams, device: str | torch.device = "cpu") -> np.ndarray:
    """Labels (uint32, consecutive) of one in-memory (3, Y, X) flow field, as ``CellposeModel.eval`` makes
    them from its network outputs (``dP = flows[:2]``, ``cellprob = flows[2]``); with ``params.exact`` the
    blockwise-exact variant (``embed.cellpose_exact.exact_masks``)."""
    flows = np.asarray(flows, dtype=np.float32)
    if params.exact:
        from .cellpose_exact import exact_masks
        return exact_masks(flows, params, device)
    from cellpose import dynamics
    masks = dynamics.resize_and_compute_masks(
        flows[:2], flows[2], niter=params.n_iter(), cellprob_threshold=params.cellprob_threshold,
        flow_threshold=params.flow_threshold, min_size=params.min_size,
        max_size_fraction=params.max_size_fraction, device=torch.device(device))
    return np.asarray(masks).astype(np.uint32)


def masks_blockwise(flows: Any, out: Any, params: FlowParams, block: int = 1024, halo: int = 64,
                    device: str | torch.device = "cpu", scratch: Any = None,
                    match_threshold: float = 0.5) -> dict[str, Any]:
    """Cellpose masks of ``flows`` (array-like (3, Y, X), e.g. a predictions zarr) into ``out`` (uint32
    array-like (Y, X)), ``block`` x ``block`` at a time with ``halo`` (>= the largest object diameter).

    With ``params.exact`` each block runs ``embed.cellpose_exact.exact_block_masks`` at its offset in the
    field and ``max_size_fraction`` is applied to the field after stitching: the result equals the untiled
    ``cellpose_masks`` of the same params (for a halo that covers the paths, see ``embed.cellpose_exact``)."""
    if params.exact:
        from .cellpose_exact import exact_block_masks
        shape = tuple(int(n) for n in out.shape)

        def block_labels(b):
            f = np.asarray(flows[(slice(None),) + b.outer], dtype=np.float32)
            return exact_block_masks(f, params, (b.outer[0].start, b.outer[1].start), shape, device)
        res = segment_blockwise(shape, out, block_labels, block, halo, scratch, match_threshold)
        return drop_large(out, res, params.max_size_fraction, block)
    return flows_blockwise(flows, out, lambda f: cellpose_masks(f, params, device), block, halo, scratch,
                           match_threshold)


def label_flows(labels: np.ndarray, cellprob: float = 10.0) -> np.ndarray:
    """(3, Y, X) float32 oracle flows of a 2D label image: cellpose's ``masks_to_flows`` (its training
    targets) scaled as its network outputs them (``instances.flows.oracle_flows``)."""
    from cellpose import dynamics

    from ..instances.flows import oracle_flows
    lab = np.asarray(labels).astype(np.int64)
    if not lab.any():
        return oracle_flows(lab, np.zeros((2,) + lab.shape, np.float32), cellprob)
    mu, _ = dynamics.masks_to_flows_gpu(lab, device=torch.device("cpu"))
    return oracle_flows(lab, mu, cellprob)


def write_oracle_flows(input_store: str, label_name: str, out_store: str, chunk: int = 512) -> int:
    """A predictions store of kind ``flows`` (as method cellpose_sam writes it) computed from
    ``labels/<label_name>`` of every field, marked as oracle flows; returns the number of fields."""
    import zarr

    from ..io.ome_zarr import create_predictions_image, describe_store, mirror_plate, open_field
    from ..steps.model import mark_predictions_source
    from ..steps.plan import mark_predictions_kind
    layout = describe_store(input_store)
    mirror_plate(layout, out_store)
    for ref in layout.fields:
        img = open_field(input_store, ref)
        data = np.asarray(open_field(img.path, f"labels/{label_name}").level(0))
        data = data.reshape(data.shape[-2:])
        path = f"{out_store}/{ref.path}" if ref.path else out_store
        group = zarr.open_group(path, mode="a", zarr_format=layout.zarr_format)
        arr = create_predictions_image(group, data.shape, (chunk, chunk), layout.version, "flows")
        arr[:] = label_flows(data).astype(np.float16)
    mark_predictions_kind(out_store, "flows")
    mark_predictions_source(out_store, {
        "kind": "oracle", "labels": label_name,
        "description": f"Cellpose flows computed from the labels/{label_name} (cellpose's masks_to_flows), not "
                       "predicted by a model"})
    return len(layout.fields)
