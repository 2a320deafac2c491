"""Synthetic OME-Zarr plates and images of nucleus-like blobs (uint16, realistic noise), with ground truth."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import zarr
from scipy import ndimage

from .ome_zarr import _array_kwargs, versioned, write_ngff


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
    fmt = int(group.metadata.zarr_format)
    datasets = []
    for lvl in range(n_levels):
        f = 2 ** lvl
        arr = data[..., ::f, ::f]
        chunks = tuple(1 if a in "ct" else min(256, s) for a, s in zip(axes, arr.shape))
        group.create_array(f"s{lvl}", data=arr, chunks=chunks, overwrite=True, **_array_kwargs(fmt))
        scale = [1.0 if a in "ct" else float(f) for a in axes]
        datasets.append({"path": f"s{lvl}", "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    types = {"c": "channel", "t": "time", "z": "space", "y": "space", "x": "space"}
    ms = versioned({"axes": [{"name": a, "type": types[a]} for a in axes], "datasets": datasets, "name": name},
                   version)
    meta = {"multiscales": [ms]}
    if labels:
        meta["image-label"] = versioned({}, version)
    else:
        meta["omero"] = {"channels": [{"label": f"ch{i}" if i else "DAPI", "color": "FFFFFF", "active": True,
                                       "window": {"start": 0, "end": 4000, "min": 0, "max": 65535}}
                                      for i in range(data.shape[0])]}
    write_ngff(group, meta, version)


def write_synthetic_plate(path: str | os.PathLike, rows: str = "AB", columns: Sequence[int] = (1, 2),
                          fields: int = 2, shape: tuple[int, int] = (256, 320), nuclei: int = 25,
                          channels: int = 1, version: str = "0.4", n_levels: int = 2, seed: int = 0,
                          ground_truth: bool = True) -> list[str]:
    """A small HCS plate; returns the field paths. NGFF 0.4 -> zarr v2, 0.5 -> zarr v3."""
    fmt = 3 if version.startswith("0.5") else 2
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    wells, paths = [], []
    for r in rows:
        for c in columns:
            wpath = f"{r}/{c}"
            wells.append({"path": wpath, "rowIndex": "ABCDEFGHIJKLMNOP".index(r), "columnIndex": list(columns).index(c)})
            well = root.require_group(wpath)
            write_ngff(well, {"well": versioned({"images": [{"path": str(i)} for i in range(fields)]}, version)},
                       version)
            for i in range(fields):
                s = seed * 100003 + len(paths)
                img, lab = blob_field(shape, nuclei, seed=s)
                data = np.stack([img] + [np.roll(img, 7 * (k + 1), axis=1) // (k + 2) for k in range(channels - 1)])
                fg = well.require_group(str(i))
                _write_multiscale(fg, data, ["c", "y", "x"], n_levels, version, "image")
                if ground_truth:
                    lg = fg.require_group("labels")
                    write_ngff(lg, {"labels": ["nuclei_gt"]}, version)
                    _write_multiscale(lg.require_group("nuclei_gt"), lab, ["y", "x"], n_levels, version,
                                      "nuclei_gt", labels=True)
                paths.append(f"{wpath}/{i}")
    plate = versioned({"name": os.path.basename(str(path)), "rows": [{"name": r} for r in rows],
                       "columns": [{"name": str(c)} for c in columns], "wells": wells, "field_count": fields},
                      version)
    write_ngff(root, {"plate": plate}, version)
    return paths
