"""Synthetic OME-Zarr plates and images of nucleus-like blobs (uint16, realistic noise), with ground truth."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import zarr
from scipy import ndimage

from . import ngff


def blob_field(shape: Sequence[int], n: int, radius: tuple[float, float] = (6, 14), seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
    """(image uint16, labels uint32): elliptic nuclei with textured intensity, blur, background and noise."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.uint32)
    yy, xx = np.indices(shape)
    k = 0
    for _ in range(n * 4):
        if k >= n:
            break
        r = rng.uniform(*radius, size=2)
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        th = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dy * np.cos(th) + dx * np.sin(th)) / r[0]
        v = (-dy * np.sin(th) + dx * np.cos(th)) / r[1]
        m = u * u + v * v <= 1
        if m.sum() < 10 or (labels[m] > 0).mean() > 0.05:
            continue
        k += 1
        labels[m & (labels == 0)] = k
    brightness = np.concatenate([[0], rng.uniform(600, 2000, size=k)])
    img = brightness[labels] * (1 + 0.15 * ndimage.gaussian_filter(rng.normal(size=shape), 2))
    img = ndimage.gaussian_filter(img, 1.2) + 200 + 30 * ndimage.gaussian_filter(rng.normal(size=shape), 20)
    img = rng.poisson(np.clip(img, 0, None)).astype(np.float64) + rng.normal(0, 15, size=shape)
    return np.clip(img, 0, 65535).astype(np.uint16), labels


def _write_multiscale(group: zarr.Group, data: np.ndarray, axes: list[str], n_levels: int, version: str,
                      name: str, labels: bool = False) -> None:
    """Levels ``s0..`` as strided picks (every 2^k-th pixel: level 0's translation holds at every level)."""
    levels = [data[..., ::2 ** k, ::2 ** k] for k in range(n_levels)]
    paths = [f"s{k}" for k in range(n_levels)]
    chunks = [tuple(1 if a in "ct" else 256 for a in axes)] * n_levels
    ngff.create_levels(group, paths, [a.shape for a in levels], chunks, data.dtype, axes, overwrite=True,
                       data=levels)
    scales = [[1.0 if a in "ct" else float(2 ** k) for a in axes] for k in range(n_levels)]
    datasets = ngff.datasets_meta(paths, scales)
    if labels:
        ngff.write_label(group, version, ngff.axes_meta(axes), datasets, name,
                         colors=ngff.label_colors(np.unique(data)))
    else:
        n = data.shape[0]
        omero = ngff.omero_meta([f"ch{i}" if i else "DAPI" for i in range(n)], ["FFFFFF"] * n,
                                [{"start": 0, "end": 4000, "min": 0, "max": 65535}] * n)
        ngff.write_image(group, version, ngff.axes_meta(axes), datasets, name, omero=omero,
                         downsampling=ngff.NEAREST)


def write_synthetic_plate(path: str | os.PathLike, rows: str = "AB", columns: Sequence[int] = (1, 2),
                          fields: int = 2, shape: tuple[int, int] = (256, 320), nuclei: int = 25,
                          channels: int = 1, version: str = "0.4", n_levels: int = 2, seed: int = 0,
                          ground_truth: bool = True) -> list[str]:
    """A small HCS plate; returns the field paths. NGFF 0.4 -> zarr v2, 0.5 -> zarr v3."""
    root = zarr.open_group(str(path), mode="w", zarr_format=ngff.zarr_format_of(version))
    wells, paths = [], []
    for r in rows:
        for c in columns:
            wpath = f"{r}/{c}"
            wells.append({"path": wpath, "rowIndex": "ABCDEFGHIJKLMNOP".index(r), "columnIndex": list(columns).index(c)})
            well = root.require_group(wpath)
            ngff.write_well(well, [str(i) for i in range(fields)], version)
            for i in range(fields):
                s = seed * 100003 + len(paths)
                img, lab = blob_field(shape, nuclei, seed=s)
                data = np.stack([img] + [np.roll(img, 7 * (k + 1), axis=1) // (k + 2) for k in range(channels - 1)])
                fg = well.require_group(str(i))
                _write_multiscale(fg, data, ["c", "y", "x"], n_levels, version, "image")
                if ground_truth:
                    lg = fg.require_group("labels")
                    ngff.write_labels_list(lg, ["nuclei_gt"], version)
                    _write_multiscale(lg.require_group("nuclei_gt"), lab, ["y", "x"], n_levels, version,
                                      "nuclei_gt", labels=True)
                paths.append(f"{wpath}/{i}")
    ngff.write_plate(root, {"name": os.path.basename(str(path)), "rows": [{"name": r} for r in rows],
                            "columns": [{"name": str(c)} for c in columns], "wells": wells,
                            "field_count": fields}, version)
    return paths
