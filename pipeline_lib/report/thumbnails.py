"""Small RGB thumbnails of fields with label outlines, read from the coarsest pyramid level that suffices."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pandas as pd
from skimage.segmentation import find_boundaries
from skimage.transform import resize

from ..io.ome_zarr import InputError, Multiscale, open_group, read_multiscale, read_region

#: Colour of the label outlines: pure magenta, absent from greyscale images and from viridis heatmaps.
OUTLINE_RGB: tuple[int, int, int] = (255, 0, 255)


def choose_level(shapes_yx: Sequence[tuple[int, int]], max_size: int) -> int:
    """Index of the smallest level whose long side is still >= ``max_size`` (level 0 if none is)."""
    big = [k for k, s in enumerate(shapes_yx) if max(s) >= max_size]
    return min(big, key=lambda k: max(shapes_yx[k])) if big else 0


def _shapes_yx(ms: Multiscale) -> list[tuple[int, int]]:
    iy, ix = ms.axis_names.index("y"), ms.axis_names.index("x")
    return [(ms.level(k).shape[iy], ms.level(k).shape[ix]) for k in range(ms.n_levels)]


def read_plane(ms: Multiscale, level: int, channel: int | None) -> np.ndarray:
    """The (y, x) plane of ``channel`` at ``level``: first time point, middle z-slice."""
    arr = ms.level(level)
    sel: list = []
    for name, size in zip(ms.axis_names, arr.shape):
        if name == "c":
            sel.append(channel if channel is not None else 0)
        elif name == "z":
            sel.append(size // 2)
        elif name in ("y", "x"):
            sel.append(slice(None))
        else:  # t or anything else: first index
            sel.append(0)
    return read_region(arr, tuple(sel), ms.path, f"level {level}").astype(np.float32, copy=False)


def thumbnail_shape(shape_yx: tuple[int, int], max_size: int) -> tuple[int, int]:
    """``shape_yx`` scaled so the long side is at most ``max_size`` (never enlarged)."""
    f = min(1.0, max_size / max(shape_yx))
    return max(1, round(shape_yx[0] * f)), max(1, round(shape_yx[1] * f))


def stretch(plane: np.ndarray, low: float = 1.0, high: float = 99.7) -> np.ndarray:
    """Percentile contrast stretch to uint8 (NaN-safe; a flat image becomes black)."""
    finite = plane[np.isfinite(plane)]
    if finite.size == 0:
        return np.zeros(plane.shape, np.uint8)
    lo, hi = np.percentile(finite, [low, high])
    scaled = (np.nan_to_num(plane, nan=lo) - lo) / max(hi - lo, 1e-12)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def placeholder(max_size: int = 256, shape_yx: tuple[int, int] | None = None) -> np.ndarray:
    """A dark grey RGB tile crossed by two lighter diagonals: 'no image'."""
    h, w = shape_yx or (max_size, max_size)
    yy, xx = np.indices((h, w))
    diag = (np.abs(yy * w - xx * h) < max(h, w) * 1.5) | (np.abs(yy * w - (w - 1 - xx) * h) < max(h, w) * 1.5)
    grey = np.where(diag, 120, 48).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _read_labels(labels_path: str | os.PathLike | None, level_shape: tuple[int, int], out_shape: tuple[int, int]
                 ) -> np.ndarray | None:
    """Labels at ``out_shape`` (nearest neighbour) from the level closest to ``level_shape``; None if absent."""
    if not labels_path or not os.path.exists(str(labels_path)):
        return None
    try:
        ms = read_multiscale(open_group(labels_path), str(labels_path))
        shapes = _shapes_yx(ms)
        k = int(np.argmin([abs(s[0] - level_shape[0]) + abs(s[1] - level_shape[1]) for s in shapes]))
        lab = read_plane(ms, k, None).astype(np.int64)
    except (InputError, KeyError, ValueError, OSError):
        return None
    if lab.shape != out_shape:
        lab = resize(lab, out_shape, order=0, preserve_range=True, anti_aliasing=False).astype(np.int64)
    return lab


def field_thumbnail(image_path: str | os.PathLike | None, labels_path: str | os.PathLike | None,
                    channel: int | str | None = 0, max_size: int = 256) -> np.ndarray:
    """RGB uint8 thumbnail (long side <= ``max_size``) of one channel with label outlines in ``OUTLINE_RGB``.

    Reads the smallest pyramid level that still has ``max_size`` pixels on its long side, so a thumbnail
    of a large field costs a few chunks. Missing labels give the image alone, a missing or unreadable
    image a placeholder.
    """
    try:
        ms = read_multiscale(open_group(image_path), str(image_path)) if image_path else None
    except (InputError, OSError):
        ms = None
    if ms is None:
        return placeholder(max_size)
    shapes = _shapes_yx(ms)
    level = choose_level(shapes, max_size)
    try:
        try:
            c = ms.channel_index(channel if channel is not None else 0)
        except InputError:  # a channel this image lacks: show its first one rather than nothing
            c = ms.channel_index(0)
        plane = read_plane(ms, level, c)
    except InputError:
        return placeholder(max_size, thumbnail_shape(shapes[level], max_size))
    out_shape = thumbnail_shape(plane.shape, max_size)
    if plane.shape != out_shape:
        plane = resize(plane, out_shape, order=1, preserve_range=True, anti_aliasing=True)
    rgb = np.repeat(stretch(plane)[..., None], 3, axis=2)
    labels = _read_labels(labels_path, shapes[level], out_shape)
    if labels is not None:
        rgb[find_boundaries(labels, mode="inner")] = OUTLINE_RGB
    return rgb


def pick_fields(fields: pd.DataFrame, n: int) -> pd.DataFrame:
    """Up to ``n`` representative fields, deterministic: failed fields first (at most a third), then fields
    with objects at evenly spaced count quantiles (highest, median, lowest, ..), one per well while wells last.
    """
    if n <= 0 or fields.empty:
        return fields.iloc[:0]
    status = fields.get("status", pd.Series("ok", index=fields.index)).astype(str)
    order = [c for c in ("plate", "well", "field", "path") if c in fields.columns]
    failed = fields[status == "failed"].sort_values(order).head(max(1, n // 3) if n > 1 else 0)
    counts = pd.to_numeric(fields.get("n_objects", pd.Series(0, index=fields.index)), errors="coerce").fillna(0)
    # the count is assigned before filtering: assigning a Series to an empty frame would adopt its index (NaN rows)
    ranked = fields.assign(_count=counts)
    ok = ranked[(status == "ok") & (counts > 0)]
    if ok.empty:  # no field has objects (e.g. an all-empty plate): show some of the empty ones
        ok = ranked[status.isin(["ok", "empty"])]
    ok = ok.sort_values(["_count", *order], ascending=[False] + [True] * len(order))
    chosen = _spread(ok, n - len(failed)).drop(columns="_count")
    return pd.concat([failed, chosen]) if len(failed) else chosen


def _spread(ranked: pd.DataFrame, k: int) -> pd.DataFrame:
    """``k`` rows at evenly spaced ranks, preferring one row per well (rows sorted by decreasing count)."""
    if k <= 0 or ranked.empty:
        return ranked.iloc[:0]
    well_key = ranked["well"].astype(str) if "well" in ranked else pd.Series(range(len(ranked)), index=ranked.index)
    firsts = ranked[~well_key.duplicated()]  # the best-counted field of each well, still sorted
    pool = firsts if len(firsts) >= k else ranked
    idx = np.unique(np.round(np.linspace(0, len(pool) - 1, min(k, len(pool)))).astype(int))
    return pool.iloc[idx]
