"""Write report.html (and the heatmap PNGs) from the aggregated outputs of a plate run."""
from __future__ import annotations

import os
from typing import Any

import pandas as pd

from ..io.ome_zarr import read_json
from ..measure.regionprops import channel_columns


def intensity_column(fields: pd.DataFrame, channel: int | str) -> str | None:
    """The ``mean_intensity_<ch>`` column of a channel given by index or name."""
    cols = [c for c in fields.columns if c.startswith("mean_intensity_")]
    if not cols:
        return None
    if isinstance(channel, int) or str(channel).isdigit():
        i = int(channel)
        return cols[i] if -len(cols) <= i < len(cols) else None
    name = f"mean_intensity_{channel_columns([channel])[0]}"
    return name if name in cols else None


def run_report(cfg: dict[str, Any], out_dir: str) -> str:
    from ..report.html import write_report
    summary = read_json(os.path.join(out_dir, "summary.json"))
    fields = pd.read_csv(os.path.join(out_dir, "fields.csv"), keep_default_na=True)
    wells = pd.read_csv(os.path.join(out_dir, "wells.csv"))
    plate = pd.read_csv(os.path.join(out_dir, "plate.csv"))
    metrics_path = os.path.join(out_dir, "metrics.csv")
    metrics = pd.read_csv(metrics_path) if cfg.get("ground_truth") and os.path.exists(metrics_path) else None
    channel = cfg["report"]["intensity_channel"]
    column = intensity_column(fields, cfg["channel"] if channel is None else channel)
    return str(write_report(out_dir, summary, fields, wells, plate, metrics,
                            read_json(os.path.join(out_dir, "provenance.json")), column,
                            cfg["report"]["thumbnails"], summary["plate_rows"], summary["plate_columns"]))
