"""Lazy access to 3D OME-Zarr volumes (zyx, czyx, tczyx with one time point) and their label images."""
from __future__ import annotations

import zarr

from .ngff import create_volume_maps  # noqa: F401 - written in io/ngff.py, imported from here by callers
from .ome_zarr import ChannelView, InputError, Multiscale


def is_volume(image: Multiscale) -> bool:
    """True for an image with a z axis of more than one slice."""
    names = image.axis_names
    return "z" in names and image.shape[names.index("z")] > 1


class Volume3D(ChannelView):
    """One channel of a volume at level 0 as a lazily read (z, y, x) array."""

    spatial = "zyx"

    def __init__(self, image: Multiscale, channel: int | None):
        if "z" not in image.axis_names:
            raise InputError(f"{image.path}: axes {image.axis_names} have no z axis; this is not a volume.")
        super().__init__(image, channel)


def read_volume_maps(path: str) -> zarr.Array:
    """The (3, Z, Y, X) maps array of a volume predictions store."""
    try:
        arr = zarr.open_group(path, mode="r")["0"]
    except Exception as e:  # noqa: BLE001
        raise InputError(f"predictions: no array '0' in '{path}' ({type(e).__name__}: {e}). Give the "
                         "predictions store of this volume (an OME-Zarr image with axes c,z,y,x).") from e
    if arr.ndim != 4 or arr.shape[0] != 3:
        raise InputError(f"predictions at {path}/0 have shape {arr.shape}; a volume needs (3, z, y, x).")
    return arr
