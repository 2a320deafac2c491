"""Per-object 3D properties (volume, centroid, bbox, z-extent) accumulated block by block.

Each block yields partial sums/minima/maxima per label; partials of the same label from different blocks
are combined with one groupby, so no step ever holds more than one block of voxels.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

PARTIAL = ["label", "voxels", "sum_z", "sum_y", "sum_x", "min_z", "min_y", "min_x", "max_z", "max_y", "max_x"]
OBJECT_COLUMNS = ["label", "volume_voxels", "volume", "centroid_z", "centroid_y", "centroid_x", "bbox_z0", "bbox_y0",
                  "bbox_x0", "bbox_z1", "bbox_y1", "bbox_x1", "z_extent"]


def block_partials(ids: np.ndarray, origin: Sequence[int]) -> pd.DataFrame:
    """Partial statistics of the labels in one (z, y, x) block whose first voxel is at ``origin``."""
    flat = ids.ravel()
    nz = np.flatnonzero(flat)
    if nz.size == 0:
        return pd.DataFrame({c: np.zeros(0, np.int64) for c in PARTIAL})
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
    return pd.DataFrame(out, columns=PARTIAL)


def combine_partials(parts: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """One row of partials per label from the rows of many blocks."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame({c: np.zeros(0, np.int64) for c in PARTIAL})
    df = pd.concat(parts, ignore_index=True)
    agg = {c: ("sum" if c.startswith(("sum", "voxels")) else "min" if c.startswith("min") else "max")
           for c in PARTIAL[1:]}
    return df.groupby("label", sort=True).agg(agg).reset_index()


def object_table(partials: pd.DataFrame, voxel_size: Sequence[float] = (1.0, 1.0, 1.0)) -> pd.DataFrame:
    """The objects table from combined partials; ``volume`` is in physical units (voxel size product)."""
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
    return out[OBJECT_COLUMNS]
