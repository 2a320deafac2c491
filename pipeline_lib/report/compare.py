"""The report's "Methods side by side" section, from the outputs of steps/compare.py (``comparison/``).

With ground truth: each method's mSA and SA50 as plate heatmaps and a map of the best method per well.
With or without it: the agreement between every pair of methods (mSA of one method's labels against the
other's) as a plate QC heatmap per pair, the wells where the methods disagree most, and the fields that
could not be compared. Heatmaps use the plate layout and marks of report/heatmap.py (crosses: wells with
a field not compared).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..io.ome_zarr import read_json
from ..measure.summaries import read_csv
from .heatmap import _label_axes, _mark_wells, _safe, figure_png, plate_axes, plate_heatmap, well_grid
from .html import esc, fmt, html_table, png_data_uri

#: Wells listed under "disagree most".
N_DISAGREE = 10
#: Winner colours (matplotlib tab10, no viridis: tests tell the maps apart by colour); ties grey.
WINNER_COLORS = ("#1f77b4", "#ff7f0e", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
TIE_COLOR = "#7f7f7f"
#: Three heatmaps a row (one per method of a three-method run) instead of the report's two.
GRID = "grid-template-columns:repeat(3,minmax(0,1fr))"


def comparison_dir(out_dir: str | Path, comparison: str | Path | None = None) -> Path | None:
    """The comparison outputs to show: ``comparison`` if given, else ``<out_dir>/comparison`` when it has
    an agreement.csv (a single-method run has none: its report is unchanged)."""
    d = Path(comparison) if comparison is not None else Path(out_dir) / "comparison"
    return d if (d / "agreement.csv").is_file() else None


def winner_heatmap(wells: pd.DataFrame, methods: Sequence[str], row_labels: Sequence[str],
                   col_labels: Sequence[str], dpi: int = 100) -> Figure:
    """The best method per well (highest well mSA) in one colour per method, ties grey, no data hatched."""
    codes = {m: i for i, m in enumerate(methods)}
    colors = [WINNER_COLORS[i % len(WINNER_COLORS)] for i in range(len(methods))] + [TIE_COLOR]
    code = wells["winner"].map(lambda w: codes.get(w, len(methods) if w == "tie" else np.nan))
    grid = well_grid(wells.assign(_code=code), "_code", row_labels, col_labels)
    n_r, n_c = grid.shape
    fig, ax = plate_axes(grid.shape, dpi)
    rgba = np.zeros((n_r, n_c, 4))
    for i, c in enumerate(colors):
        rgba[grid == i] = [int(c[k:k + 2], 16) / 255 for k in (1, 3, 5)] + [1.0]
    ax.imshow(rgba, interpolation="nearest", aspect="equal", zorder=1)
    _mark_wells(ax, wells, row_labels, col_labels)
    _label_axes(ax, row_labels, col_labels)
    names = list(methods) + ["tie"]
    present = [i for i in range(len(names)) if (grid == i).any()]
    ax.legend(handles=[Patch(facecolor=colors[i], label=names[i]) for i in present], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title("Best method per well (highest mSA)", fontsize=11)
    ax.set_xlabel("hatched: no ground truth   \u00d7: field(s) not compared", fontsize=7, color="#444444")
    return fig


def unit_heatmaps(wells: pd.DataFrame, specs: dict[str, tuple[str, str, str]], png_dir: Path,
                  row_labels: Sequence[str], col_labels: Sequence[str]) -> dict[str, Path]:
    """``heatmap_<name>.png`` for each {name: (wells column, title, failed-count column)} on the fixed [0, 1]
    scale of the scores (so that the methods' maps compare by colour); crosses from the failed column."""
    png_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (column, title, failed) in specs.items():
        if column not in wells:
            continue
        w = wells.assign(n_failed=wells[failed]) if failed in wells else wells
        path = png_dir / f"heatmap_{_safe(name)}.png"
        path.write_bytes(figure_png(plate_heatmap(w, column, row_labels, col_labels, title, unit_range=True)))
        out[name] = path
    return out


def _figures(pngs: dict[str, Path], titles: dict[str, str]) -> str:
    return "".join(f'<figure><img alt="{esc(titles[k])} heatmap" src="{png_data_uri(p.read_bytes())}">'
                   f"<figcaption>{esc(titles[k])} \u2013 <code>{esc(p.name)}</code></figcaption></figure>"
                   for k, p in pngs.items())


def _cards(summary: dict) -> str:
    cards = []
    for pair, v in (summary.get("agreement") or {}).items():
        cards.append((fmt(v.get("msa")), f"agreement {pair.replace('_vs_', ' vs ')} (mSA)"))
    for m, s in (summary.get("accuracy") or {}).items():
        if s:
            cards.append((fmt(s.get("msa")), f"{m} mSA"))
            cards.append((fmt(s.get("sa50")), f"{m} SA50"))
    for m, n in (summary.get("winners") or {}).items():
        cards.append((fmt(n), f"wells won by {m}"))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{esc(v)}</div><div class="k">{esc(k)}</div></div>' for v, k in cards) \
        + "</div>"


def _read(path: Path) -> pd.DataFrame:
    try:
        return read_csv(str(path))
    except pd.errors.EmptyDataError:  # a table without rows or columns (no field compared)
        return pd.DataFrame()


def comparison_section(comp: str | Path, png_dir: str | Path, row_labels: Sequence[str],
                       col_labels: Sequence[str]) -> str:
    """The section's HTML; its heatmaps go to ``png_dir/heatmap_compare_<name>.png``."""
    comp, png_dir = Path(comp), Path(png_dir)
    summary = read_json(comp / "summary.json")
    methods = list(summary["methods"])
    pairs = [tuple(p) for p in summary["pairs"]]
    wells = _read(comp / "wells.csv")
    agreement = read_csv(comp / "agreement.csv")
    parts = ['<section id="comparison"><h2>Methods side by side</h2>',
             f'<p class="note">Methods: {esc(", ".join(methods))}. Agreement = mSA of one method\'s labels with '
             "the other's as reference (mean of both directions; 1 = the same objects, 0 = no object matched "
             "at IoU \u2265 0.5). Low agreement points at the wells (or images) to inspect, with or without ground truth.</p>",
             _cards(summary)]
    if summary.get("kind") == "image":  # one image or volume: no wells to map, the pairs as a table
        cols = ["method_a", "method_b", "status", "msa", "sa50", "msa_b_vs_a", "msa_a_vs_b", "n_a", "n_b", "error"]
        parts.append("<h3>Agreement between methods</h3>" + html_table(agreement, cols) + "</section>")
        return "".join(parts)
    if summary.get("ground_truth") and not wells.empty and "winner" in wells:
        specs = {f"compare_{s}_{m}": (f"{s}_{m}", f"{m}: {'mSA' if s == 'msa' else 'SA50'} against ground truth",
                                      f"n_failed_{m}") for s in ("msa", "sa50") for m in methods}
        pngs = unit_heatmaps(wells, specs, png_dir, row_labels, col_labels)
        win = png_dir / "heatmap_compare_winner.png"
        win.write_bytes(figure_png(winner_heatmap(wells, methods, row_labels, col_labels)))
        pngs["compare_winner"] = win
        titles = {**{k: t for k, (_, t, _) in specs.items()}, "compare_winner": "Best method per well"}
        parts.append(f'<h3>Accuracy per method</h3><div class="heatmaps" style="{GRID}">'
                     f"{_figures(pngs, titles)}</div>")
    specs = {f"compare_agreement_{a}_vs_{b}": (f"agreement_{a}_vs_{b}", f"Agreement {a} vs {b} (mSA)", "n_failed")
             for a, b in pairs}
    pngs = unit_heatmaps(wells, specs, png_dir, row_labels, col_labels) if not wells.empty else {}
    titles = {k: t for k, (_, t, _) in specs.items()}
    parts.append(f'<h3>Agreement between methods</h3><div class="heatmaps" style="{GRID}">'
                 f"{_figures(pngs, titles)}</div>"
                 if pngs else '<h3>Agreement between methods</h3><p class="note">no field compared</p>')
    parts.append(disagreement_table(wells, pairs, methods))
    bad = agreement[agreement["status"].astype(str) != "ok"]
    parts.append(f"<h3>Fields not compared ({len(bad)})</h3>"
                 + html_table(bad, ["well", "field", "path", "method_a", "method_b", "status", "error"]))
    parts.append("</section>")
    return "".join(parts)


def disagreement_table(wells: pd.DataFrame, pairs: Sequence[tuple], methods: Sequence[str]) -> str:
    """The ``N_DISAGREE`` wells with the lowest agreement (any pair, any field), lowest first."""
    if wells.empty or "min_agreement" not in wells:
        return '<h3>Wells where the methods disagree most</h3><p class="note">none</p>'
    w = wells.assign(min_agreement=pd.to_numeric(wells["min_agreement"], errors="coerce"))
    w = w.dropna(subset=["min_agreement"]).sort_values("min_agreement", kind="stable").head(N_DISAGREE)
    cols = ["well", "min_agreement", "worst_pair", "worst_field", *[f"agreement_{a}_vs_{b}" for a, b in pairs],
            *[f"msa_{m}" for m in methods], "winner"]
    heads = {"min_agreement": "lowest field agreement", "worst_pair": "pair", "worst_field": "field",
             **{f"agreement_{a}_vs_{b}": f"{a} vs {b} (well mean)" for a, b in pairs},
             **{f"msa_{m}": f"{m} mSA" for m in methods}}
    return (f"<h3>Wells where the methods disagree most ({len(w)} lowest)</h3>"
            + html_table(w, cols, heads))


def _plate_name(method_out: Path, summary: dict) -> str:
    """The plate's name from a method's ``plate.csv`` (as that method's own report shows it), else the input's
    file name (an image or a volume)."""
    path = method_out / "plate.csv"
    if path.exists():
        plate = pd.read_csv(path)
        if len(plate) and isinstance(plate["plate"].iloc[0], str) and plate["plate"].iloc[0]:
            return plate["plate"].iloc[0]
    return Path(str(summary.get("input") or "image").rstrip("/")).name or "image"


def write_comparison_report(out_dir: str | Path, methods: Sequence[str]) -> Path:
    """``<out_dir>/report.html`` of a run with several methods: the plate, the methods with their models and
    links to each method's own report (``methods/<method>/report.html``), and the "Methods side by side"
    section from ``<out_dir>/comparison``."""
    from ..io.ome_zarr import write_atomic
    from .heatmap import plate_format
    from .html import CSS
    out = Path(out_dir)
    summaries = {m: read_json(out / "methods" / m / "summary.json") for m in methods}
    first = summaries[methods[0]]
    rows, cols = plate_format(first.get("plate_rows") or [], first.get("plate_columns") or [])
    rows_html = []
    for m, s in summaries.items():
        model = s.get("model") or {}
        name = "none (stored predictions)" if model.get("skipped") else model.get("name") or model.get("checkpoint", "")
        link = f'<a href="methods/{esc(m)}/report.html">report</a>'
        rows_html.append((m, f"model {esc(name)} \u00b7 {esc(fmt(s.get('n_objects', '')))} objects \u00b7 {link}"))
    table = "".join(f"<tr><td>{esc(k)}</td><td>{v}</td></tr>"
                    for k, v in [("Input", esc(first.get("input", "")))] + rows_html)
    head = (f"<header><h1>Methods side by side \u2013 {esc(_plate_name(out / 'methods' / methods[0], first))}</h1>"
            f'<table class="meta">{table}</table></header>')
    body = head + comparison_section(out / "comparison", out / "report", rows, cols)
    doc = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Methods side by side</title>'
           f"<style>{CSS}</style></head><body>{body}</body></html>\n")
    path = out / "report.html"
    write_atomic(path, lambda p: p.write_text(doc, encoding="utf-8"))
    return path
