"""The report of a volume run: one self-contained ``report.html`` like the plate report's (same CSS and
helpers, no scripts, no URLs).

Sections: header and numbers (objects, blocks, merge), failed blocks (name, z range, yx region, error),
z-slice thumbnails with label outlines (read from the coarsest pyramid level that still has ``max_size``
pixels, so a 40k x 40k slice costs a few chunks), histograms of object size and z extent, and the config.
Every string from data is HTML-escaped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from skimage.segmentation import find_boundaries
from skimage.transform import resize

from ..io.ome_zarr import InputError, Multiscale, open_group, read_multiscale, read_region, write_atomic
from .heatmap import figure_png
from .html import CSS, esc, html_table, kv_table, png_data_uri, rgb_png, to_yaml
from .thumbnails import OUTLINE_RGB, choose_level, placeholder, stretch, thumbnail_shape


def _shapes_yx(ms: Multiscale) -> list[tuple[int, int]]:
    iy, ix = ms.axis_names.index("y"), ms.axis_names.index("x")
    return [(ms.level(k).shape[iy], ms.level(k).shape[ix]) for k in range(ms.n_levels)]


def read_slice(ms: Multiscale, level: int, z: int, channel: int | None) -> np.ndarray:
    """The (y, x) plane of slice ``z`` (level-0 index; levels downsample yx only) of ``channel``."""
    arr = ms.level(level)
    sel: list = []
    for name, size in zip(ms.axis_names, arr.shape):
        sel.append((channel or 0) if name == "c" else min(z, size - 1) if name == "z"
                   else slice(None) if name in ("y", "x") else 0)
    return read_region(arr, tuple(sel), ms.path, f"level {level}, slice {z}")


def slice_thumbnail(image: str, labels: str, z: int, channel: int | None, max_size: int = 256) -> np.ndarray:
    """RGB thumbnail of slice ``z`` with the label outlines in ``OUTLINE_RGB`` (a placeholder if unreadable)."""
    try:
        ms = read_multiscale(open_group(image), image)
        level = choose_level(_shapes_yx(ms), max_size)
        plane = read_slice(ms, level, z, ms.channel_index(channel if channel is not None else 0))
        plane = plane.astype(np.float32)
    except (InputError, OSError, KeyError, ValueError):
        return placeholder(max_size)
    out = thumbnail_shape(plane.shape, max_size)
    if plane.shape != out:
        plane = resize(plane, out, order=1, preserve_range=True, anti_aliasing=True)
    rgb = np.repeat(stretch(plane)[..., None], 3, axis=2)
    try:
        lab_ms = read_multiscale(open_group(labels), labels)
        lab = read_slice(lab_ms, min(level, lab_ms.n_levels - 1), z, None).astype(np.int64)
    except (InputError, OSError, KeyError, ValueError):
        return rgb
    if lab.shape != out:
        lab = resize(lab, out, order=0, preserve_range=True, anti_aliasing=False).astype(np.int64)
    rgb[find_boundaries(lab, mode="inner")] = OUTLINE_RGB
    return rgb


def pick_slices(n_z: int, n: int) -> list[int]:
    """``n`` slice indices spread evenly over the volume (centres of n equal parts)."""
    n = max(0, min(n, n_z))
    return sorted({int((i + 0.5) * n_z / n) for i in range(n)})


def histogram_png(values: np.ndarray, title: str, xlabel: str, log: bool = False) -> bytes:
    fig = Figure(figsize=(4.6, 3.0), dpi=100)
    ax = fig.add_subplot()
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v) & (v > 0)] if log else v[np.isfinite(v)]
    if v.size:
        bins = (np.logspace(np.log10(v.min()), np.log10(v.max()) + 1e-9, 40) if log
                else np.arange(v.min(), v.max() + 2) - 0.5 if v.max() - v.min() < 80 else 40)
        ax.hist(v, bins=bins, color="#4477aa")
        if log:
            ax.set_xscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("objects", fontsize=9)
    return figure_png(fig)


def failed_blocks_table(summary: Mapping) -> pd.DataFrame:
    """One row per failed block: name, batch, slices, yx origin of its tile, error."""
    g = summary["grid"]
    rows = []
    for name, err in sorted((summary.get("failed_blocks") or {}).items()):
        s = int(name[1:6])
        rows.append({"block": name, "slices": f"{s * g['z_block']}..{min((s + 1) * g['z_block'], summary['shape'][0]) - 1}",
                     "tile": int(name[8:]), "error": err})
    return pd.DataFrame(rows, columns=["block", "slices", "tile", "error"])


def write_volume_report(out_dir: str | Path, summary: Mapping, objects: pd.DataFrame, image: str,
                        channel: int | str | None = 0, n_thumbnails: int = 6, max_size: int = 256) -> Path:
    """Write ``<out_dir>/report.html`` for a volume run from its summary and objects table."""
    out = Path(out_dir)
    failed = failed_blocks_table(summary)
    counts = summary.get("block_status_counts") or {}
    merge = summary.get("merge") or {}
    head = ("<h1>Volume segmentation report</h1>"
            + kv_table([("input", summary["input"]), ("shape (z, y, x)", " x ".join(map(str, summary["shape"]))),
                        ("voxel size (z, y, x)", ", ".join(f"{v:g}" for v in summary["voxel_size"])),
                        ("method", summary["method"]), ("labels", summary["labels"]),
                        ("table", summary.get("table", "")),
                        ("grid", f"tile {summary['grid']['tile']}, halo {summary['grid']['halo']}, "
                                 f"z_block {summary['grid']['z_block']}: {summary['grid']['n_blocks']} blocks")]))
    cards = [("objects", summary["n_objects"], False), ("blocks ok", counts.get("ok", 0), False),
             ("blocks empty", counts.get("empty", 0), False), ("blocks failed", len(failed), len(failed) > 0),
             ("2D pieces", merge.get("n_pieces", ""), False), ("yx joins", merge.get("n_yx_joins", ""), False),
             ("median z extent", (summary.get("z_extent") or {}).get("median"), False)]
    card_html = "".join(f'<div class="card{" bad" if bad else ""}"><div class="v">{esc(v if v is not None else "")}'
                        f'</div><div class="k">{esc(k)}</div></div>' for k, v, bad in cards)
    if len(failed):
        fail = (f"<h2>Failed blocks ({len(failed)})</h2><p class=\"note\">Left empty in the labels. Rerun the "
                f"same command after fixing the input: only batches {esc(', '.join(summary.get('failed_batches', [])))}"
                " are segmented again.</p>" + html_table(failed, list(failed.columns)))
    else:
        fail = '<h2>Failed blocks</h2><p class="ok">none</p>'
    figs = []
    for z in pick_slices(summary["shape"][0], n_thumbnails):
        rgb = slice_thumbnail(image, summary["labels"], z, channel, max_size)
        figs.append(f'<figure><img src="{png_data_uri(rgb_png(rgb))}" alt="slice {z}">'
                    f"<figcaption>slice z = {z}</figcaption></figure>")
    thumbs = f'<h2>Slices with label outlines</h2><div class="thumbs">{"".join(figs)}</div>'
    hists = [histogram_png(objects["volume_voxels"].to_numpy(), "object size", "voxels (log)", log=True),
             histogram_png(objects["z_extent"].to_numpy(), "object z extent", "slices")]
    hist = ('<h2>Objects</h2><div class="heatmaps">' + "".join(
        f'<figure><img src="{png_data_uri(p)}" alt="histogram"></figure>' for p in hists) + "</div>")
    config = f"<h2>Config</h2><pre>{esc(to_yaml(summary.get('config', {})))}</pre>"
    body = [head, f'<div class="cards">{card_html}</div>', fail, thumbs, hist, config]
    doc = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Volume report</title>'
           f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
    path = out / "report.html"
    write_atomic(path, lambda p: p.write_text(doc, encoding="utf-8"))
    return path


def run_volume_report(cfg: dict[str, Any], out_dir: str, summary_path: str, objects_path: str) -> str:
    """The report step of the volume rules (``rule volume_report``)."""
    from ..io.ome_zarr import read_json
    summary = read_json(summary_path)
    channel = cfg["report"]["intensity_channel"]
    return str(write_volume_report(out_dir, summary, pd.read_parquet(objects_path, columns=["volume_voxels",
                                                                                           "z_extent"]),
                                   summary["input"], cfg["channel"] if channel is None else channel,
                                   cfg["report"]["thumbnails"]))


__all__: Sequence[str] = ["write_volume_report", "run_volume_report", "slice_thumbnail", "pick_slices"]
