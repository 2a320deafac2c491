"""Cellpose-SAM in the workflow: the GPU ``predict`` job writes flows, the CPU ``segment`` job makes masks.

``predict`` (:func:`run_cellpose_predict_batch`): cellpose's network (``embed.cellpose_net``) on batched
256 x 256 tiles with ``cellpose.halo`` of every field of a batch, normalised with each field's 1/99
percentiles (recorded in the field's predictions group as ``cellpose_normalization``), into a (3, Y, X)
float16 predictions store of kind ``flows`` (dY, dX, cellprob). ``segment`` runs
``steps.segment.run_segment_batch`` with :func:`cellpose_instances` as the per-field step: cellpose's own
dynamics per ``cellpose.mask_block`` block with ``cellpose.mask_halo``, stitched by halo-overlap matching
(``cellpose.exact``: the blockwise-exact variant, ``embed.cellpose_exact``).
With ``predictions:`` set to such a store, only the mask step runs (no GPU, no model).
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np
import zarr
from tqdm import tqdm

from ..config import cellpose_params
from ..engine.runner import UNIT_ERRORS, describe, run_units
from ..io.ome_zarr import Plane2D, create_predictions_image, open_field, write_json_atomic
from .plan import recheck_field

NORMALIZATION_KEY = "cellpose_normalization"  # attribute of a field's predictions group: the 1/99 bounds


def cellpose_instances(cfg: dict[str, Any], flows: Any, out: Any, scratch: Any, progress: Any,
                       threads: int = 1) -> dict[str, Any]:
    """Cellpose masks of one field's flows (a (3, Y, X) zarr) into ``out``, block by block (CPU)."""
    from ..embed.cellpose_dynamics import masks_blockwise
    c = cfg["cellpose"]
    res = masks_blockwise(flows, out, cellpose_params(cfg), block=c["mask_block"], halo=c["mask_halo"],
                          device="cpu", scratch=scratch)
    return {**res, "label": np.arange(1, res["n_objects"] + 1)}


def _dtype(precision: str, device) -> Any:
    import torch
    if device.type != "cuda":
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_net(model_info: dict[str, Any], cfg: dict[str, Any]):
    """The resolved CPSAM file on the configured device, in ``cellpose.precision`` on CUDA."""
    from ..models.cellpose import load_cellpose_net
    from ..models.loading import select_device
    device = select_device(cfg["model"]["device"])
    dtype = _dtype(cfg["cellpose"]["precision"], device)
    net = load_cellpose_net(model_info["checkpoint"], device)
    if dtype != net.dtype:  # as cellpose does for bf16: weights and inputs in that dtype
        net = net.to(dtype)
        net.dtype = dtype
    return net


def flow_task(cfg: dict[str, Any], plan: dict[str, Any], f: dict[str, Any]):
    """The field's plane, a fresh (3, Y, X) float16 flows image, and its 1/99 bounds (stored with it)."""
    from ..embed.cellpose_net import FlowTask, field_lowhigh
    img = open_field(plan["input"], f["path"])
    plane = Plane2D(img, img.channel_index(cfg["channel"]))
    group = zarr.open_group(f["predictions"], mode="a", zarr_format=plan["zarr_format"])
    out = create_predictions_image(group, plane.shape, (cfg["tiling"]["tile"],) * 2, plan["version"], "flows")
    lowhigh = field_lowhigh(plane)
    group.attrs[NORMALIZATION_KEY] = {
        "percentiles": [1.0, 99.0],
        "lowhigh": [[None if np.isnan(v) else float(v) for v in row] for row in lowhigh]}
    return FlowTask(f["key"], plane, out, lowhigh)


def run_cellpose_predict_batch(cfg: dict[str, Any], plan: dict[str, Any], batch: str, model_info: dict[str, Any],
                               marker: str, overlap: bool = True) -> dict[str, Any]:
    """Flows of every field of ``batch``; the tiles of all fields share network batches. A field that fails
    (e.g. a corrupt chunk) is then redone alone so that it is reported by name and the others finish."""
    from ..embed.cellpose_net import TILE, net_tiles, predict_flows
    from ..engine.overlap import DeviceClock, StageTimes, timing_line
    fields = [plan["fields"][i] for i in plan["batches"][batch]]
    c = cfg["cellpose"]
    net = load_net(model_info, cfg)
    tasks = []

    def prepare(f: dict[str, Any]) -> dict[str, Any]:
        tasks.append(flow_task(cfg, plan, recheck_field(cfg, plan, f)))
        return {"status": "ok"}

    status = run_units([(f["key"], f) for f in fields], prepare, f"open {batch}")
    n_tiles = sum(len(net_tiles(t.image.shape, TILE, c["halo"])) for t in tasks)
    clock, times = DeviceClock(net.device), StageTimes()
    with tqdm(total=n_tiles, desc=f"cellpose {batch} ({net.device})", unit="tile", file=sys.stderr) as bar:
        try:
            predict_flows(net, tasks, c["halo"], c["batch_size"], bar.update, clock, times, overlap)
        except UNIT_ERRORS:
            for task in tasks:  # one at a time: the failing field is named, the others are written
                try:
                    predict_flows(net, [task], c["halo"], c["batch_size"], clock=clock, times=times, overlap=overlap)
                except UNIT_ERRORS as e:
                    status[task.key] = {"status": "failed", "error": describe(e)}
    timing = {**clock.report(times), "overlap": overlap, "tiles": n_tiles}
    timing["tiles_per_s"] = round(n_tiles / max(timing["wall_s"], 1e-9), 2)
    print(timing_line(f"cellpose predict {batch} ({n_tiles} tiles)", timing), file=sys.stderr)
    result = {"batch": batch, "device": str(net.device), "timing": timing, "fields": status}
    write_json_atomic(marker, result)
    return result
