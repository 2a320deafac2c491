"""Per-field, per-well and per-plate summaries and accuracy tables (fields.csv, wells.csv, plate.csv,
metrics.csv), built from the per-field summaries of the measure jobs, never from whole images.

Column meanings are documented in README.md ("Outputs"). Conventions: failed and missing fields count as
failed and contribute no objects; means over objects pool all objects of the well or plate; scores of a
well or plate are the mean over its scored fields (per image, then averaged, as in the micro-sam papers).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

KEYS = ["plate", "well", "row", "column"]
#: Text columns of the CSV outputs. Keys are strings, as in objects.parquet; a CSV carries no types and pandas
#: reads a column "01" as the integer 1, so read the CSVs with these dtypes (read_csv) to merge them.
CSV_DTYPES = {"plate": str, "well": str, "row": str, "column": str, "field": str, "path": str, "error": str,
              "level": str, "qc": str}
SCORES = ["msa", "sa50", "error_rate"]
COUNTS = ["n_pred", "n_true", "tp50"]


def fields_table(fields: Sequence[dict], status: dict[str, dict]) -> pd.DataFrame:
    """One row per planned field; ``_area_sum`` and ``_isum_<ch>`` are helper columns for the wells."""
    rows = []
    for f in fields:
        s = status.get(f["key"], {"status": "missing", "n_objects": 0})
        st = s["status"] if s["status"] in ("ok", "empty") else "failed" if s["status"] == "failed" else "missing"
        n = int(s.get("n_objects", 0)) if st in ("ok", "empty") else 0
        area = s.get("field_area_px")
        px = s.get("pixel_size_um")
        row = {**{k: f[k] for k in KEYS}, "field": f["field"], "path": f["path"], "status": st,
               "error": s.get("error", ""), "n_objects": n, "field_area_px": area, "pixel_size_um": px,
               "objects_per_mpx": n / area * 1e6 if area else np.nan,
               "density_per_mm2": n / (area * px * px) * 1e6 if area and px else np.nan,
               "mean_area_px": s["area_sum"] / n if n else np.nan,
               "median_area_px": s.get("median_area_px") if n else np.nan, "_area_sum": s.get("area_sum", 0.0)}
        counts = s.get("intensity_counts") or {}
        for ch, v in (s.get("intensity_sums") or {}).items():
            k = counts.get(ch, n) if n else 0  # objects with a finite intensity (NaN / inf pixels left out)
            row[f"mean_intensity_{ch}"] = v / k if k else np.nan
            row[f"_isum_{ch}"] = v
            row[f"_icnt_{ch}"] = k
        bad = s.get("n_nonfinite") or {}
        row["n_nonfinite_px"] = int(sum(bad.values()))
        row["qc"] = "; ".join(f"{v} NaN/inf pixels in {ch} (left out of normalisation and intensities)"
                              for ch, v in bad.items())
        scores = s.get("scores")
        if "scores" in s or "ground_truth_missing" in s:
            row.update({k: (scores or {}).get(k, np.nan) for k in SCORES + COUNTS})
        rows.append(row)
    df = pd.DataFrame(rows)
    for c in ("field_area_px", "pixel_size_um", "median_area_px"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def read_csv(path: str) -> pd.DataFrame:
    """fields.csv, wells.csv, plate.csv or metrics.csv with its key columns as strings (see CSV_DTYPES)."""
    return pd.read_csv(path, dtype=CSV_DTYPES)


def public(df: pd.DataFrame) -> pd.DataFrame:
    """The table without its helper columns (as written to CSV)."""
    return df[[c for c in df.columns if not c.startswith("_")]]


def robust_z(x: pd.Series) -> pd.Series:
    """(x - median) / (1.4826 MAD), falling back to the mean absolute deviation when the MAD is 0."""
    dev = (x - x.median()).abs()
    scale = 1.4826 * dev.median()
    if not scale > 0:
        scale = 1.2533 * dev.mean()
    return (x - x.median()) / scale if scale > 0 else x * 0.0


def _pooled(g: pd.DataFrame, channels: list[str], areas: pd.Series | None) -> dict[str, Any]:
    done = g["status"].isin(["ok", "empty"])
    n = int(g["n_objects"].sum())
    area = float(g.loc[done, "field_area_px"].sum())
    phys = g.loc[done, "field_area_px"] * g.loc[done, "pixel_size_um"] ** 2
    out = {"n_fields": len(g), "n_ok": int((g["status"] == "ok").sum()), "n_empty": int((g["status"] == "empty").sum()),
           "n_failed": int((~done).sum()), "n_objects": n,
           "objects_per_field": n / int(done.sum()) if done.any() else np.nan,
           "objects_per_mpx": n / area * 1e6 if area else np.nan,
           "density_per_mm2": n / phys.sum() * 1e6 if done.any() and phys.notna().all() and phys.sum() else np.nan,
           "mean_area_px": g["_area_sum"].sum() / n if n else np.nan,
           "median_area_px": float(areas.median()) if areas is not None and len(areas) else np.nan,
           "n_nonfinite_px": int(g["n_nonfinite_px"].sum()) if "n_nonfinite_px" in g else 0}
    for ch in channels:
        k = g[f"_icnt_{ch}"].sum() if f"_icnt_{ch}" in g else n
        out[f"mean_intensity_{ch}"] = g[f"_isum_{ch}"].sum() / k if k else np.nan
    for k in SCORES:
        if k in g:
            out[k] = g[k].mean()
    return out


def _channels(fields: pd.DataFrame) -> list[str]:
    return [c[len("_isum_"):] for c in fields.columns if c.startswith("_isum_")]


def wells_table(fields: pd.DataFrame, areas: pd.DataFrame, outlier_mad: float = 3.5) -> pd.DataFrame:
    """One row per well; ``areas`` holds (plate, well, area) of every object (for exact medians)."""
    channels = _channels(fields)
    by_well = dict(iter(areas.groupby(["plate", "well"], observed=True)["area"])) if len(areas) else {}
    rows = [{**dict(zip(KEYS, key)), **_pooled(g, channels, by_well.get(key[:2]))}
            for key, g in fields.groupby(KEYS, sort=False)]
    wells = pd.DataFrame(rows)
    measured = wells["n_ok"] + wells["n_empty"] > 0
    z = pd.Series(np.nan, index=wells.index)
    z[measured] = robust_z(wells.loc[measured, "objects_per_field"].astype(float))
    wells["count_robust_z"] = z
    wells["outlier"] = (z.abs() > outlier_mad).fillna(False)
    wells["qc"] = [_qc(r) for r in wells.itertuples()]
    return wells


def _qc(r) -> str:
    reasons = []
    if r.n_failed:
        reasons.append(f"{r.n_failed} failed field{'s' * (r.n_failed > 1)}")
    if r.n_empty:
        reasons.append(f"{r.n_empty} empty field{'s' * (r.n_empty > 1)}")
    if r.n_nonfinite_px:
        reasons.append(f"{r.n_nonfinite_px} NaN/inf pixels (left out)")
    if r.outlier:
        reasons.append(f"count outlier (robust z {r.count_robust_z:+.1f})")
    return "; ".join(reasons)


def plate_table(fields: pd.DataFrame, wells: pd.DataFrame, areas: pd.DataFrame) -> pd.DataFrame:
    """One row per plate."""
    channels = _channels(fields)
    rows = []
    for plate, g in fields.groupby("plate", sort=False):
        a = areas.loc[areas["plate"] == plate, "area"] if len(areas) else None
        w = wells[wells["plate"] == plate]
        rows.append({"plate": plate, "n_wells": len(w), **_pooled(g, channels, a),
                     "n_outlier_wells": int(w["outlier"].sum())})
    return pd.DataFrame(rows)


def metrics_table(fields: pd.DataFrame) -> pd.DataFrame:
    """Scores per field, and their means per well and per plate (counts summed), in one long table."""
    f = fields[fields["status"].isin(["ok", "empty"])]
    cols = ["plate", "well", "field"] + SCORES + COUNTS
    field_rows = f[cols].assign(level="field")
    agg = {**{k: "mean" for k in SCORES}, **{k: "sum" for k in COUNTS}}
    scored = field_rows.dropna(subset=["msa"])
    well_rows = scored.groupby(["plate", "well"], sort=False).agg(agg).reset_index().assign(level="well", field="")
    n_well = scored.groupby(["plate", "well"], sort=False).size().to_numpy()
    well_rows["n_fields"] = n_well
    plate_rows = scored.groupby("plate", sort=False).agg(agg).reset_index().assign(level="plate", well="", field="")
    plate_rows["n_fields"] = scored.groupby("plate", sort=False).size().to_numpy()
    field_rows = field_rows.assign(n_fields=field_rows["msa"].notna().astype(int))
    out = pd.concat([field_rows, well_rows, plate_rows], ignore_index=True)
    return out[["level"] + cols + ["n_fields"]]
