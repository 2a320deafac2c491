"""Write report.html (and the heatmap PNGs) from the aggregated outputs of a plate run."""
from __future__ import annotations

import os
from typing import Any

from ..io.ome_zarr import read_json
from ..measure.summaries import read_csv


def run_report(cfg: dict[str, Any], out_dir: str) -> str:
    from ..report.html import write_report
    summary = read_json(os.path.join(out_dir, "summary.json"))
    read = (lambda name: read_csv(os.path.join(out_dir, name)))
    fields, wells, plate = read("fields.csv"), read("wells.csv"), read("plate.csv")
    has_metrics = cfg.get("ground_truth") and os.path.exists(os.path.join(out_dir, "metrics.csv"))
    metrics = read("metrics.csv") if has_metrics else None
    channel = cfg["report"]["intensity_channel"]
    return str(write_report(out_dir, summary, fields, wells, plate, metrics,
                            read_json(os.path.join(out_dir, "provenance.json")),
                            cfg["channel"] if channel is None else channel,
                            cfg["report"]["thumbnails"], summary["plate_rows"], summary["plate_columns"]))
