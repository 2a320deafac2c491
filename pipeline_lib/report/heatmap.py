"""Plate heatmaps laid out as the physical plate (rows A.., columns 1..), as matplotlib figures and PNGs.

Figures are built on the Agg canvas without pyplot, so nothing leaks into pyplot's global figure list and
the module works in worker processes without a display.
"""
from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..io.ome_zarr import row_index, row_name

#: Standard plate formats (rows, columns): 6, 12, 24, 48, 96, 384 and 1536 wells.
PLATE_FORMATS: tuple[tuple[int, int], ...] = ((2, 3), (3, 4), (4, 6), (6, 8), (8, 12), (16, 24), (32, 48))
#: Colour of the failed-well cross and the outlier-well frame.
MARK_COLOR = "#ff1f1f"
#: Values in [0, 1] by definition: their colour scale is fixed so plates can be compared.
UNIT_RANGE_COLUMNS = ("msa", "sa50", "error_rate")


def _col_key(name: object) -> str:
    """Column label without zero padding ("02" -> "2"), so store names and plate labels match."""
    s = str(name).strip()
    return str(int(s)) if s.isdigit() else s


def _row_key(name: object) -> str:
    return str(name).strip().upper()


def plate_format(rows: Sequence[object], columns: Sequence[object]) -> tuple[list[str], list[str]]:
    """(row labels, column labels) of the smallest standard plate holding ``rows`` x ``columns``.

    Rows are letter names (A, B, ..), columns numbers (1, "02", ..). Names that are neither are kept as
    given, in their order; a plate larger than 1536 wells gets exactly the rows/columns it needs.
    """
    r_idx = [row_index(r) for r in rows]
    c_num = [int(c) if str(c).strip().isdigit() else None for c in columns]
    if not rows or not columns or None in r_idx or None in c_num or min(c_num) < 1:  # type: ignore[type-var]
        return [_row_key(r) for r in rows], [_col_key(c) for c in columns]
    need_r, need_c = max(r_idx) + 1, max(c_num)  # type: ignore[type-var]
    n_r, n_c = next(((fr, fc) for fr, fc in PLATE_FORMATS if fr >= need_r and fc >= need_c), (need_r, need_c))
    return [row_name(i) for i in range(n_r)], [str(i + 1) for i in range(n_c)]


def well_grid(wells: pd.DataFrame, column: str, row_labels: Sequence[str], col_labels: Sequence[str]
              ) -> np.ndarray:
    """(rows, columns) float array of ``wells[column]`` at each well's plate position; NaN where no data."""
    grid = np.full((len(row_labels), len(col_labels)), np.nan)
    if column not in wells or wells.empty:
        return grid
    r, c = _positions(wells, row_labels, col_labels)
    values = pd.to_numeric(wells[column], errors="coerce").to_numpy(dtype=float)
    ok = (r >= 0) & (c >= 0)
    grid[r[ok], c[ok]] = values[ok]
    return grid


def _positions(wells: pd.DataFrame, row_labels: Sequence[str], col_labels: Sequence[str]
               ) -> tuple[np.ndarray, np.ndarray]:
    """Row and column index of each well in the layout; -1 for wells outside it."""
    rpos = {_row_key(r): i for i, r in enumerate(row_labels)}
    cpos = {_col_key(c): i for i, c in enumerate(col_labels)}
    r = wells["row"].map(lambda v: rpos.get(_row_key(v), -1)).to_numpy(dtype=int)
    c = wells["column"].map(lambda v: cpos.get(_col_key(v), -1)).to_numpy(dtype=int)
    return r, c


def _flag_positions(wells: pd.DataFrame, flag: pd.Series, row_labels: Sequence[str], col_labels: Sequence[str]
                    ) -> tuple[np.ndarray, np.ndarray]:
    r, c = _positions(wells, row_labels, col_labels)
    keep = flag.to_numpy(dtype=bool) & (r >= 0) & (c >= 0)
    return r[keep], c[keep]


def _failed_flags(wells: pd.DataFrame) -> pd.Series:
    if "n_failed" not in wells:
        return pd.Series(False, index=wells.index)
    return pd.to_numeric(wells["n_failed"], errors="coerce").fillna(0) > 0


def _outlier_flags(wells: pd.DataFrame) -> pd.Series:
    if "outlier" not in wells:
        return pd.Series(False, index=wells.index)
    return wells["outlier"].map(lambda v: str(v).strip().lower() in ("true", "1", "1.0")).astype(bool)


def plate_axes(shape: tuple[int, int], dpi: int):
    """A figure sized for a plate grid of ``shape`` (rows, columns) and its axes, with every well hatched
    grey underneath (wells without data stay so)."""
    n_r, n_c = shape
    cell = min(0.55, 10.0 / max(n_c, 1))
    fig = Figure(figsize=(cell * n_c + 2.2, cell * n_r + 1.4), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.add_patch(Rectangle((-0.5, -0.5), n_c, n_r, facecolor="#d9d9d9", edgecolor="#a6a6a6", hatch="///",
                           linewidth=0, zorder=0))
    return fig, ax


def plate_heatmap(wells: pd.DataFrame, value_column: str, row_labels: Sequence[str], col_labels: Sequence[str],
                  title: str, cmap: str = "viridis", unit_range: bool | None = None, dpi: int = 100) -> Figure:
    """A heatmap of ``wells[value_column]`` over the plate layout, with a colour bar.

    Wells without data are hatched grey, wells with failed fields crossed and outlier wells framed (both in
    ``MARK_COLOR``); ``unit_range`` (default: for mSA-like columns) fixes the scale to [0, 1].
    """
    grid = well_grid(wells, value_column, row_labels, col_labels)
    n_r, n_c = grid.shape
    fig, ax = plate_axes(grid.shape, dpi)
    if unit_range is None:
        unit_range = value_column in UNIT_RANGE_COLUMNS
    finite = grid[np.isfinite(grid)]
    vmin, vmax = (0.0, 1.0) if unit_range else ((finite.min(), finite.max()) if finite.size else (0.0, 1.0))
    if vmax <= vmin:  # one value everywhere: a unit-wide scale around it, never below 0 for counts/areas
        vmin = max(vmin - 0.5, 0.0) if vmin >= 0 else vmin - 0.5
        vmax = vmin + 1.0
    cm = colormaps[cmap].with_extremes(bad=(0, 0, 0, 0))
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cm, vmin=vmin, vmax=vmax, interpolation="nearest",
                   aspect="equal", zorder=1)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    _mark_wells(ax, wells, row_labels, col_labels)
    _label_axes(ax, row_labels, col_labels)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("hatched: no data   \u00d7: failed field(s)   \u25a1: outlier well", fontsize=7, color="#444444")
    return fig


def _mark_wells(ax, wells: pd.DataFrame, row_labels: Sequence[str], col_labels: Sequence[str]) -> None:
    """Cross wells with failed fields and frame outlier wells."""
    if wells.empty:
        return
    r, c = _flag_positions(wells, _failed_flags(wells), row_labels, col_labels)
    ax.scatter(c, r, marker="x", s=40, linewidths=1.6, color=MARK_COLOR, zorder=3)
    r, c = _flag_positions(wells, _outlier_flags(wells), row_labels, col_labels)
    for y, x in zip(r, c):
        ax.add_patch(Rectangle((x - 0.45, y - 0.45), 0.9, 0.9, fill=False, edgecolor=MARK_COLOR, linewidth=2,
                               zorder=4))


def _label_axes(ax, row_labels: Sequence[str], col_labels: Sequence[str]) -> None:
    """Every row/column labelled (top column labels as on a plate), white grid lines between wells."""
    n_r, n_c = len(row_labels), len(col_labels)
    small = 7 if n_c > 24 else 8
    ax.set_xticks(range(n_c), [str(c) for c in col_labels], fontsize=small, rotation=90 if n_c > 24 else 0)
    ax.set_yticks(range(n_r), [str(r) for r in row_labels], fontsize=small)
    ax.xaxis.tick_top()
    ax.set_xticks(np.arange(-0.5, n_c, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n_r, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="both", length=0)
    ax.set_xlim(-0.5, n_c - 0.5)
    ax.set_ylim(n_r - 0.5, -0.5)
    for spine in ax.spines.values():
        spine.set_visible(False)


def figure_png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    fig.clear()
    return buf.getvalue()


def write_heatmaps(wells: pd.DataFrame, columns_to_plot: Mapping[str, str] | Sequence[str], out_dir: str | Path,
                   row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
                   titles: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Write ``heatmap_<name>.png`` into ``out_dir`` for each {name: column} (or column); returns name -> path.

    Columns missing from ``wells`` are skipped. The layout defaults to the smallest standard plate holding
    the wells present.
    """
    if row_labels is None or col_labels is None:
        row_labels, col_labels = plate_format(sorted(set(wells["row"]), key=str), sorted(set(wells["column"]), key=str))
    mapping = dict(columns_to_plot) if isinstance(columns_to_plot, Mapping) else {c: c for c in columns_to_plot}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, column in mapping.items():
        if column not in wells:
            continue
        fig = plate_heatmap(wells, column, row_labels, col_labels, (titles or {}).get(name, column))
        path = out / f"heatmap_{_safe(name)}.png"
        path.write_bytes(figure_png(fig))
        paths[name] = path
    return paths


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))
