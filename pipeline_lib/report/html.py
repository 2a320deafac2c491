"""The run report: one self-contained ``report.html`` (inline CSS, PNGs as data URIs, no scripts, no URLs).

Sections: header, summary numbers, plate heatmaps, QC, field thumbnails with label outlines, metrics
(with ground truth) and provenance. Every string that comes from data is HTML-escaped.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from ..io.ome_zarr import write_atomic
from ..measure.regionprops import channel_columns
from .heatmap import plate_format, write_heatmaps
from .thumbnails import field_thumbnail, pick_fields

#: Rows shown per QC/metrics table; the rest is counted, not listed (keeps the file small).
MAX_TABLE_ROWS = 200

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px;color:#222;
 background:#fff;max-width:1360px}
h1{font-size:22px;margin:0 0 6px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:28px}
h3{font-size:15px;margin:16px 0 6px}
table{border-collapse:collapse;font-size:13px;margin:4px 0 10px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.err{max-width:700px;white-space:pre-wrap;word-break:break-word;font-family:monospace;font-size:12px}
.meta td:first-child{font-weight:600;white-space:nowrap}
.model{font-size:15px;padding:6px 10px;border:1px solid #bbb;background:#f7f7f7;display:inline-block;margin:6px 0}
.model code{font-size:13px}.model.oracle{display:table;border-color:#c77700;background:#fff4e0}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #ccc;border-radius:6px;padding:8px 12px;min-width:110px}
.card .v{font-size:20px;font-weight:600}.card .k{font-size:12px;color:#555}
.card.bad .v{color:#b00000}
.heatmaps{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:16px}
.heatmaps figure,.thumbs figure{margin:0}
.heatmaps img{max-width:100%;height:auto;border:1px solid #eee}
.thumbs{display:grid;grid-template-columns:repeat(auto-fill,minmax(264px,1fr));gap:14px}
.thumbs img{display:block;image-rendering:pixelated;border:1px solid #999;max-width:256px}
figcaption{font-size:12px;color:#333;margin-top:3px}
pre{background:#f6f6f6;border:1px solid #ddd;padding:8px;font-size:12px;overflow-x:auto;white-space:pre-wrap}
.note{color:#555;font-size:13px}.ok{color:#2a6b2a}
"""


# ----------------------------------------------------------------------------------------------- helpers


def esc(value: Any) -> str:
    """HTML-escaped text of any value (quotes included, so it is safe in attributes too)."""
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """Display text of a number or string: NaN/None as a dash, floats to 4 significant digits."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "\u2013"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    if not isinstance(value, (list, tuple, dict, np.ndarray)) and pd.isna(value):
        return "\u2013"
    return str(value)


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def rgb_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def html_table(df: pd.DataFrame, columns: Sequence[str], headers: Mapping[str, str] | None = None,
               err_columns: Iterable[str] = ("error", "qc"), max_rows: int = MAX_TABLE_ROWS) -> str:
    """An escaped HTML table of ``df[columns]`` (missing columns left out), with a note on cut rows."""
    cols = [c for c in columns if c in df.columns]
    if df.empty or not cols:
        return '<p class="note">none</p>'
    head = "".join(f"<th>{esc((headers or {}).get(c, c))}</th>" for c in cols)
    body = []
    for rec in df[cols].head(max_rows).to_dict("records"):
        cells = []
        for c in cols:
            v = rec[c]
            cls = "err" if c in err_columns else ("num" if isinstance(v, (int, float, np.number)) else "")
            cells.append(f'<td class="{cls}">{esc(fmt(v))}</td>' if cls else f"<td>{esc(fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = f'<p class="note">\u2026 and {len(df) - max_rows} more (see the CSV files)</p>' if len(df) > max_rows else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


def kv_table(pairs: Iterable[tuple[str, Any]], cls: str = "meta") -> str:
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(fmt(v))}</td></tr>" for k, v in pairs)
    return f'<table class="{cls}">{rows}</table>'


def to_yaml(data: Any) -> str:
    """YAML of JSON-like data; numpy scalars, paths and other objects become plain values or strings."""
    plain = json.loads(json.dumps(data, default=_plain))
    return yaml.safe_dump(plain, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _plain(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


def _first(df: pd.DataFrame | None) -> dict[str, Any]:
    return df.iloc[0].to_dict() if df is not None and not df.empty else {}


def _has_values(df: pd.DataFrame | None, column: str) -> bool:
    return df is not None and column in df and pd.to_numeric(df[column], errors="coerce").notna().any()


# ----------------------------------------------------------------------------------------------- choices


def intensity_column_of(wells: pd.DataFrame, intensity: str | int | None) -> str | None:
    """The wells column for the intensity heatmap: a column name, or a channel by index or OMERO label (as
    the measure step names its columns). None when a given channel has no column; the first when none given."""
    candidates = [c for c in wells.columns if str(c).startswith("mean_intensity_")]
    if intensity is None:
        return candidates[0] if candidates else None
    if isinstance(intensity, int) or str(intensity).isdigit():
        i = int(intensity)
        return candidates[i] if -len(candidates) <= i < len(candidates) else None
    for name in (str(intensity), f"mean_intensity_{intensity}", f"mean_intensity_{channel_columns([intensity])[0]}"):
        if name in candidates:
            return name
    return None


def heatmap_columns(wells: pd.DataFrame, intensity_column: str | None) -> dict[str, tuple[str, str]]:
    """name -> (wells column, title) of the heatmaps to draw: count, mean area, intensity, mSA when present."""
    count = "objects_per_field" if _has_values(wells, "objects_per_field") else "n_objects"
    out = {"count": (count, "Objects per field" if count == "objects_per_field" else "Objects per well"),
           "mean_area": ("mean_area_px", "Mean object area (px)")}
    if _has_values(wells, "density_per_mm2"):
        out["density"] = ("density_per_mm2", "Objects per mm\u00b2")
    if intensity_column:
        out["intensity"] = (intensity_column, "Mean intensity " + intensity_column.removeprefix("mean_intensity_"))
    if _has_values(wells, "msa"):
        out["msa"] = ("msa", "mSA (mean segmentation accuracy)")
    return {k: v for k, v in out.items() if v[0] in wells.columns}


# ----------------------------------------------------------------------------------------------- sections


def header_section(summary: Mapping, plate: pd.DataFrame, provenance: Mapping) -> str:
    p = _first(plate)
    model = dict(provenance.get("model") or summary.get("model") or {})
    name = model.get("name") or model.get("checkpoint") or "unknown"
    hashes = [(k, v) for k, v in model.items() if any(t in k.lower() for t in ("hash", "xxh", "sha", "md5"))]
    hash_html = " ".join(f"{esc(k)} <code>{esc(v)}</code>" for k, v in hashes) or "hash unknown"
    if model.get("skipped"):  # instances from stored decoder maps: no model ran in this run
        name, hash_html = "none", esc(model.get("reason", "not loaded"))
    source = model.get("predictions_source") or {}
    meta = [("Plate", p.get("plate", "")), ("Input", summary.get("input", "")),
            ("Method", provenance.get("method") or summary.get("method", "")),
            ("Decoder maps", model.get("predictions", "")), ("Labels", summary.get("labels_name", "")),
            ("Config", _config_name(provenance)), ("Created", provenance.get("created", ""))]
    oracle = source.get("kind") == "oracle"
    banner = (f'<div class="model oracle"><b>{esc(source.get("kind", "stored").upper())} decoder maps</b>: '
              f'{esc(source.get("description", ""))}</div>') if source else ""
    return (f"<header><h1>Segmentation report \u2013 {esc(p.get('plate', '') or 'image')}"
            f"{' (oracle maps)' if oracle else ''}</h1>{banner}"
            f'<div class="model">Model <b>{esc(name)}</b> \u00b7 {hash_html}</div>'
            f"{kv_table([(k, v) for k, v in meta if v not in ('', None)])}</header>")


def _config_name(provenance: Mapping) -> str:
    for key in ("configfiles", "config_path", "configfile", "config_file"):
        if provenance.get(key):
            v = provenance[key]
            return ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    return ""


def summary_section(plate: pd.DataFrame) -> str:
    p = _first(plate)
    keys = [("n_wells", "wells"), ("n_fields", "fields"), ("n_ok", "fields ok"), ("n_empty", "empty fields"),
            ("n_failed", "failed fields"), ("n_outlier_wells", "outlier wells"), ("n_objects", "objects"),
            ("objects_per_field", "objects / field"), ("mean_area_px", "mean area (px)"),
            ("median_area_px", "median area (px)"), ("msa", "mSA"), ("sa50", "SA50"), ("error_rate", "error rate")]
    cards = []
    for key, label in keys:
        if key not in p:
            continue
        bad = key in ("n_failed", "n_outlier_wells") and pd.notna(p[key]) and p[key] > 0
        cards.append(f'<div class="card{" bad" if bad else ""}"><div class="v">{esc(fmt(p[key]))}</div>'
                     f'<div class="k">{esc(label)}</div></div>')
    return f'<section id="summary"><h2>Summary</h2><div class="cards">{"".join(cards)}</div></section>'


def heatmap_section(pngs: Mapping[str, Path], titles: Mapping[str, str]) -> str:
    figs = [f'<figure><img alt="{esc(titles.get(k, k))} heatmap" src="{png_data_uri(p.read_bytes())}">'
            f"<figcaption>{esc(titles.get(k, k))} \u2013 <code>{esc(p.name)}</code></figcaption></figure>"
            for k, p in pngs.items()]
    body = f'<div class="heatmaps">{"".join(figs)}</div>' if figs else '<p class="note">no well data</p>'
    return f'<section id="heatmaps"><h2>Plate heatmaps</h2>{body}</section>'


def qc_section(fields: pd.DataFrame, wells: pd.DataFrame, metrics: pd.DataFrame | None) -> str:
    status = fields["status"].astype(str) if "status" in fields else pd.Series("ok", index=fields.index)
    fcols = ["well", "field", "path", "n_objects", "error"]
    parts = ['<section id="qc"><h2>Quality control</h2>']
    for st, title in (("failed", "Failed fields"), ("missing", "Missing fields (no result)"),
                      ("empty", "Empty fields (no objects)")):
        sub = fields[status == st]
        if st == "missing" and sub.empty:
            continue
        parts.append(f"<h3>{esc(title)} ({len(sub)})</h3>{html_table(sub, fcols)}")
    flagged = wells[_flag_series(wells)] if not wells.empty else wells
    parts.append(f"<h3>Flagged wells ({len(flagged)})</h3>"
                 + html_table(flagged, ["well", "n_fields", "n_ok", "n_empty", "n_failed", "n_objects",
                                        "objects_per_field", "outlier", "qc"]))
    if metrics is not None:
        no_gt = fields_without_ground_truth(fields, metrics)
        parts.append(f"<h3>Fields without ground truth ({len(no_gt)})</h3>"
                     + html_table(no_gt, ["well", "field", "path", "status"]))
    parts.append("</section>")
    return "".join(parts)


def _flag_series(wells: pd.DataFrame) -> pd.Series:
    outlier = wells["outlier"].astype(str).str.lower().isin(["true", "1", "1.0"]) if "outlier" in wells \
        else pd.Series(False, index=wells.index)
    qc = wells["qc"].fillna("").astype(str).str.strip() != "" if "qc" in wells else pd.Series(False, index=wells.index)
    return outlier | qc


def fields_without_ground_truth(fields: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """Segmented fields without a field-level metrics row (without field rows: those with a NaN mSA)."""
    segmented = fields[fields["status"].astype(str).isin(["ok", "empty"])] if "status" in fields else fields
    m = metrics[metrics["level"].astype(str) == "field"] if "level" in metrics else metrics
    if m.empty and "msa" in fields:
        return segmented[pd.to_numeric(segmented["msa"], errors="coerce").isna()]
    keys = {(str(r.get("plate")), str(r.get("well")), str(r.get("field"))) for r in m.to_dict("records")}
    has = segmented.apply(lambda r: (str(r.get("plate")), str(r.get("well")), str(r.get("field"))) in keys, axis=1)
    return segmented[~has.astype(bool)] if len(segmented) else segmented


def thumbnail_section(summary: Mapping, fields: pd.DataFrame, n: int, channel: int | str | None,
                      max_size: int) -> str:
    chosen = pick_fields(fields, n)
    if chosen.empty:
        return '<section id="thumbnails"><h2>Fields</h2><p class="note">no fields shown</p></section>'
    where = {(str(f.get("plate", "")), str(f.get("path", ""))): f for f in summary.get("fields", [])}
    figs = []
    for rec in chosen.to_dict("records"):
        info = where.get((str(rec.get("plate", "")), str(rec.get("path", ""))), {})
        rgb = field_thumbnail(info.get("image"), info.get("labels"), channel, max_size)
        caption = (f"{rec.get('well', '')} / field {rec.get('field', '')} \u2013 {fmt(rec.get('n_objects'))} objects"
                   f" ({rec.get('status', '')})")
        figs.append(f'<figure><img alt="{esc(caption)}" width="{rgb.shape[1]}" height="{rgb.shape[0]}" '
                    f'src="{png_data_uri(rgb_png(rgb))}"><figcaption>{esc(caption)}</figcaption></figure>')
    return (f'<section id="thumbnails"><h2>Fields</h2><p class="note">Label outlines in magenta; '
            f"channel {esc(channel)}.</p><div class=\"thumbs\">{''.join(figs)}</div></section>")


def metrics_section(metrics: pd.DataFrame | None) -> str:
    if metrics is None or metrics.empty:
        return ""
    cols = ["well", "field", "msa", "sa50", "error_rate", "n_pred", "n_true", "tp50"]
    level = metrics["level"].astype(str) if "level" in metrics else pd.Series("field", index=metrics.index)
    plate_rows = metrics[level == "plate"]
    well_rows = metrics[level == "well"]
    return ('<section id="metrics"><h2>Metrics against ground truth</h2>'
            f"<h3>Plate</h3>{html_table(plate_rows, ['plate', *cols[2:]])}"
            f"<h3>Wells</h3>{html_table(well_rows, ['well', *cols[2:]])}</section>")


def provenance_section(provenance: Mapping) -> str:
    model = dict(provenance.get("model") or {})
    versions = dict(provenance.get("versions") or {})
    run = [(k, v) for k, v in provenance.items()
           if k not in ("config", "model", "params", "versions") and not isinstance(v, (dict, list))]
    parts = ['<section id="provenance"><h2>Provenance</h2>', f"<h3>Run</h3>{kv_table(run)}",
             f"<h3>Model</h3>{kv_table(_flat(model))}"]
    if provenance.get("params") is not None:
        parts.append(f"<h3>Parameters</h3><pre>{esc(to_yaml(provenance['params']))}</pre>")
    parts.append(f"<h3>Package versions</h3>{kv_table(sorted(versions.items()))}")
    extra = {k: v for k, v in provenance.items() if k not in ("config", "model", "params", "versions")
             and isinstance(v, (dict, list))}
    if extra:
        parts.append(f"<h3>Other</h3><pre>{esc(to_yaml(extra))}</pre>")
    if provenance.get("config") is not None:
        parts.append(f"<h3>Config</h3><pre>{esc(to_yaml(provenance['config']))}</pre>")
    parts.append("</section>")
    return "".join(parts)


def _flat(d: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, Mapping):
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", json.dumps(v, default=_plain) if isinstance(v, list) else v))
    return out


# ----------------------------------------------------------------------------------------------- report


def write_report(out_dir: str | Path, summary: Mapping, fields: pd.DataFrame, wells: pd.DataFrame,
                 plate: pd.DataFrame, metrics: pd.DataFrame | None, provenance: Mapping,
                 intensity_column: str | int | None = None, n_thumbnails: int = 6,
                 plate_rows: Sequence[str] | None = None, plate_columns: Sequence[str] | None = None,
                 thumbnail_channel: int | str | None = None, max_size: int = 256,
                 comparison: str | Path | None = None) -> Path:
    """Write ``<out_dir>/report.html`` and the heatmap PNGs ``<out_dir>/report/heatmap_<name>.png``.

    ``plate_rows``/``plate_columns`` are the plate's row/column names (NGFF plate metadata); the heatmaps
    show the smallest standard plate holding them. Thumbnails show ``thumbnail_channel`` (default: the
    segmented channel of the config). ``comparison``: the outputs of steps/compare.py to show as the
    "Methods side by side" section (default ``<out_dir>/comparison`` when it exists; report/compare.py).
    """
    out = Path(out_dir)
    rows = list(plate_rows) if plate_rows else sorted(set(wells.get("row", pd.Series(dtype=str)).astype(str)))
    cols = list(plate_columns) if plate_columns else sorted(set(wells.get("column", pd.Series(dtype=str)).astype(str)))
    row_labels, col_labels = plate_format(rows, cols)
    chosen = heatmap_columns(wells, intensity_column_of(wells, intensity_column))
    titles = {k: t for k, (_, t) in chosen.items()}
    pngs = write_heatmaps(wells, {k: c for k, (c, _) in chosen.items()}, out / "report", row_labels, col_labels,
                          titles) if not wells.empty else {}
    if thumbnail_channel is None:
        thumbnail_channel = (provenance.get("config") or {}).get("channel", 0)
    from .compare import comparison_dir, comparison_section  # it imports this module's helpers
    comp = comparison_dir(out, comparison)
    body = [header_section(summary, plate, provenance), summary_section(plate), heatmap_section(pngs, titles),
            comparison_section(comp, out / "report", row_labels, col_labels) if comp else "",
            qc_section(fields, wells, metrics), thumbnail_section(summary, fields, n_thumbnails, thumbnail_channel,
                                                                  max_size),
            metrics_section(metrics), provenance_section(provenance)]
    title = f"Segmentation report \u2013 {_first(plate).get('plate', '')}"
    doc = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
           f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
    path = out / "report.html"
    write_atomic(path, lambda p: p.write_text(doc, encoding="utf-8"))
    return path
