"""Decoder maps computed from a label image ("oracle predictions"), for tests, benchmarks and ablations.

Channels as micro-sam's decoder predicts them (torch-em's ``PerObjectDistanceTransform``): foreground
(labels > 0); distance to the object's center (its centroid, or the innermost point when the centroid lies
outside the object), normalised to [0, 1] per object; inverted distance to the object's boundary,
normalised per object (0 at the innermost point, 1 at the boundary). Background is 1 in both distances.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import find_boundaries

EPS = 1e-7


def oracle_maps(labels: np.ndarray) -> np.ndarray:
    """(3, *labels.shape) float32 maps for a 2D or 3D label image (vectorised over objects)."""
    labels = np.asarray(labels)
    ids = labels.astype(np.int64)
    n = int(ids.max()) if ids.size else 0
    out = np.ones((3,) + labels.shape, dtype=np.float32)
    out[0] = labels > 0
    if n == 0:
        return out
    fg = ids > 0
    boundaries = find_boundaries(labels, mode="inner")
    bdist = ndimage.distance_transform_edt(~boundaries).astype(np.float64)
    bdist[~fg] = 0
    flat = ids.ravel()
    index = np.arange(1, n + 1)
    bmax = np.zeros(n + 1)
    bmax[1:] = ndimage.maximum(bdist, ids, index)
    inner_pt = ndimage.maximum_position(bdist, ids, index)
    area = np.bincount(flat, minlength=n + 1).astype(np.float64)
    grids = np.indices(labels.shape)
    centers = np.zeros((labels.ndim, n + 1))
    for ax in range(labels.ndim):
        with np.errstate(invalid="ignore"):
            centers[ax] = np.bincount(flat, weights=grids[ax].ravel(), minlength=n + 1) / np.maximum(area, 1)
    c_int = np.clip(np.round(centers).astype(np.int64), 0, np.array(labels.shape)[:, None] - 1)
    inside = ids[tuple(c_int)] == np.arange(n + 1)
    for k in np.nonzero(~inside[1:])[0] + 1:  # rare: non-convex objects whose centroid is outside
        if area[k] > 0:
            c_int[:, k] = inner_pt[k - 1]
    cdist = np.sqrt(sum((grids[ax] - c_int[ax][ids]) ** 2 for ax in range(labels.ndim)))
    cmax = np.zeros(n + 1)
    cmax[1:] = ndimage.maximum(cdist, ids, index)
    out[1][fg] = (cdist / (cmax[ids] + EPS))[fg]
    out[2][fg] = ((bmax[ids] - bdist) / (bmax[ids] + EPS))[fg]
    return out


def write_oracle_predictions(input_store: str, label_name: str, out_store: str, chunk: int = 512) -> int:
    """A predictions store (same layout as the workflow writes) computed from ``labels/<label_name>``."""
    import zarr

    from ..io.ome_zarr import create_predictions_image, describe_store, mirror_plate, open_field

    layout = describe_store(input_store)
    mirror_plate(layout, out_store)
    for ref in layout.fields:
        img = open_field(input_store, ref)
        lab = open_field(img.path, f"labels/{label_name}")
        data = np.asarray(lab.level(0))
        data = data.reshape(data.shape[-2:])
        path = f"{out_store}/{ref.path}" if ref.path else out_store
        group = zarr.open_group(path, mode="a", zarr_format=layout.zarr_format)
        arr = create_predictions_image(group, data.shape, (chunk, chunk), layout.version)
        arr[:] = oracle_maps(data).astype(np.float16)
    zarr.open_group(out_store, mode="a").attrs["pipeline_lib_predictions_kind"] = "sam_maps"  # methods.STORE_KIND_KEY
    return len(layout.fields)
