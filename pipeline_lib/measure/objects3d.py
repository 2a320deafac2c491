"""Per-object 3D properties (volume, centroid, bbox, z-extent, intensity per channel) accumulated block by block.

Each block yields partial sums/minima/maxima per label; partials of the same label from different blocks
are combined with one groupby, so no step ever holds more than one block of voxels. Intensity partials
are ``isum_<c>``, ``imin_<c>``, ``imax_<c>`` per channel index c (float64 sums: exact for uint16 blocks).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

PARTIAL = ["label", "voxels", "sum_z", "sum_y", "sum_x", "min_z", "min_y", "min_x", "max_z", "max_y", "max_x"]
OBJECT_COLUMNS = ["label", "volume_voxels", "volume", "centroid_z", "centroid_y", "centroid_x", "bbox_z0", "bbox_y0",
                  "bbox_x0", "bbox_z1", "bbox_y1", "bbox_x1", "z_extent"]


def intensity_partials(n_channels: int) -> list[str]:
    return [f"{k}_{c}" for c in range(n_channels) for k in ("isum", "imin", "imax")]


def block_partials(ids: np.ndarray, origin: Sequence[int], intensities: np.ndarray | None = None) -> pd.DataFrame:
    """Partial statistics of the labels in one (z, y, x) block whose first voxel is at ``origin``;
    ``intensities`` (c, z, y, x) adds the intensity partials of every channel."""
    flat = ids.ravel()
    nz = np.flatnonzero(flat)
    cols = PARTIAL + intensity_partials(0 if intensities is None else len(intensities))
    if nz.size == 0:
        return pd.DataFrame({c: np.zeros(0, np.float64 if c[0] == "i" else np.int64) for c in cols})
    lab = flat[nz].astype(np.int64)
    order = np.argsort(lab, kind="stable")
    lab, nz = lab[order], nz[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    coords = np.unravel_index(nz, ids.shape)
    out = {"label": lab[starts], "voxels": np.diff(np.r_[starts, len(lab)])}
    for ax, name in enumerate("zyx"):
        c = coords[ax].astype(np.int64) + int(origin[ax])
        out[f"sum_{name}"] = np.add.reduceat(c, starts)
        out[f"min_{name}"] = np.minimum.reduceat(c, starts)
        out[f"max_{name}"] = np.maximum.reduceat(c, starts)
    for ch in range(0 if intensities is None else len(intensities)):
        v = np.asarray(intensities[ch]).ravel()[nz].astype(np.float64)
        out[f"isum_{ch}"] = np.add.reduceat(v, starts)
        out[f"imin_{ch}"] = np.minimum.reduceat(v, starts)
        out[f"imax_{ch}"] = np.maximum.reduceat(v, starts)
    return pd.DataFrame(out, columns=cols)


def combine_partials(parts: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """One row of partials per label from the rows of many blocks."""
    cols = list(parts[0].columns) if len(parts) else PARTIAL
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame({c: np.zeros(0, np.float64 if c[0] == "i" else np.int64) for c in cols})
    df = pd.concat(parts, ignore_index=True)
    agg = {c: ("sum" if c.startswith(("sum", "voxels", "isum")) else "min" if c.startswith(("min", "imin"))
               else "max") for c in df.columns if c != "label"}
    return df.groupby("label", sort=True).agg(agg).reset_index()


def object_table(partials: pd.DataFrame, voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                 channels: Sequence[str] = ()) -> pd.DataFrame:
    """The objects table from combined partials; ``volume`` is in physical units (voxel size product);
    ``intensity_{mean,min,max,sum}_<channel>`` for the channel suffixes ``channels`` (partials 0, 1, ...)."""
    p = partials
    n = p["voxels"].to_numpy(np.float64)
    out = pd.DataFrame({"label": p["label"].astype(np.uint32), "volume_voxels": p["voxels"].astype(np.int64),
                        "volume": n * float(np.prod(voxel_size))})
    for name in "zyx":
        out[f"centroid_{name}"] = p[f"sum_{name}"].to_numpy(np.float64) / np.maximum(n, 1)
    for name in "zyx":
        out[f"bbox_{name}0"] = p[f"min_{name}"].astype(np.int64)
    for name in "zyx":
        out[f"bbox_{name}1"] = p[f"max_{name}"].astype(np.int64) + 1
    out["z_extent"] = out["bbox_z1"] - out["bbox_z0"]
    out = out[OBJECT_COLUMNS]
    for ch, name in enumerate(channels):
        total = p[f"isum_{ch}"].to_numpy(np.float64)
        out[f"intensity_mean_{name}"] = total / np.maximum(n, 1)
        out[f"intensity_min_{name}"] = p[f"imin_{ch}"].to_numpy(np.float64)
        out[f"intensity_max_{name}"] = p[f"imax_{ch}"].to_numpy(np.float64)
        out[f"intensity_sum_{name}"] = total
    return out
