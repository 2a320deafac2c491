"""The volume workflow's passes in one process, and a pass-1 segmenter that returns given slices.

Tests and ``bench/volume_accuracy.py`` run exactly the functions the Snakemake rules call, in the rules'
order, without Snakemake's start-up per job.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..config import validate_config
from ..steps.model import resolve_model
from ..steps.plan import write_plan
from ..steps.volume_relabel import aggregate_volume, run_volume_relabel_batch
from ..steps.volume_segment import run_volume_segment_batch
from ..steps.volume_stitch import run_volume_edges_batch, run_volume_merge


class SliceLabels:
    """Pass-1 segmenter returning given per-slice labels (e.g. ground-truth slices), crop by crop."""

    device = "cpu"

    def __init__(self, labels: Any):
        self.labels = labels

    def block(self, z0: int, z1: int, region: tuple) -> np.ndarray:
        return np.asarray(self.labels[(slice(z0, z1),) + tuple(region)], dtype=np.uint32)


def run_volume_steps(cfg: dict[str, Any], segmenter: Any = None) -> dict[str, Any]:
    """All passes of the volume workflow on ``cfg`` (validated here); returns the summary."""
    cfg = validate_config(cfg)
    out = cfg["output"]
    model = resolve_model(cfg, progress=False)
    plan = write_plan(cfg, f"{out}/plan.json")
    segs = [f"{out}/jobs/volume_segment/{b}.json" for b in plan["batches"]]
    edges = [f"{out}/jobs/volume_edges/{b}.npz" for b in plan["batches"]]
    tabs = [f"{out}/jobs/volume_relabel/{b}.parquet" for b in plan["batches"]]
    lut, merge_json = f"{out}/volume/lut.npy", f"{out}/volume/merge.json"
    for b, p in zip(plan["batches"], segs):
        run_volume_segment_batch(cfg, plan, b, model, p, segmenter=segmenter)
    for b, p in zip(plan["batches"], edges):
        run_volume_edges_batch(cfg, plan, b, segs, p)
    run_volume_merge(cfg, plan, segs, edges, lut, merge_json)
    for b, p in zip(plan["batches"], tabs):
        run_volume_relabel_batch(cfg, plan, b, segs, lut, p[:-len(".parquet")] + ".json", p, merge_json)
    return aggregate_volume(cfg, plan, model, segs, merge_json, tabs, f"{out}/summary.json",
                            f"{out}/objects.parquet")
