"""Write report.html (and the heatmap PNGs) from the aggregated outputs of a plate run."""
from __future__ import annotations

import os
from typing import Any

import pandas as pd

from ..io.ome_zarr import read_json
from ..measure.regionprops import channel_columns


KEY_TYPES = {"plate": str, "well": str, "row": str, "column": str, "field": str, "path": str, "error": str}


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
    read = (lambda name: pd.read_csv(os.path.join(out_dir, name), dtype=KEY_TYPES, keep_default_na=True))
    fields, wells, plate = read("fields.csv"), read("wells.csv"), read("plate.csv")
    has_metrics = cfg.get("ground_truth") and os.path.exists(os.path.join(out_dir, "metrics.csv"))
    metrics = read("metrics.csv") if has_metrics else None
    channel = cfg["report"]["intensity_channel"]
    column = intensity_column(fields, cfg["channel"] if channel is None else channel)
    return str(write_report(out_dir, summary, fields, wells, plate, metrics,
                            read_json(os.path.join(out_dir, "provenance.json")), column,
                            cfg["report"]["thumbnails"], summary["plate_rows"], summary["plate_columns"]))
