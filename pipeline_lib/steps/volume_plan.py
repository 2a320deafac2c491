"""The job plan of a volume: its grid (slabs x tiles), batches of blocks, and the stores jobs write into.

A batch (one job of every per-batch rule) is a contiguous range ``[start, stop)`` of flat block indices
``slab * n_tiles + tile`` (``volume.blocks_per_job`` blocks), so a job's memory and run time depend on the
block size and the group size, never on the slice area. Blocks in that order are also the order of the
global piece ids, so a batch's pieces are one contiguous id range.

Label metadata and the scratch store are created here once; jobs then only write array chunks.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import zarr

from ..io.ome_zarr import (InputError, StoreLayout, create_label_image, describe_store, mirror_plate, open_field,
                           open_group)
from ..io.volume import Volume3D, is_volume, read_volume_maps
from ..stitch.volume_grid import VolumeGrid


def input_is_volume(path: str) -> bool:
    """True when ``path`` is a single OME-Zarr image with more than one z-slice (False if unreadable)."""
    try:
        layout = describe_store(path)
        return layout.kind == "image" and is_volume(open_field(path, ""))
    except (InputError, OSError, KeyError):
        return False


def plan_grid(plan: dict[str, Any]) -> VolumeGrid:
    return VolumeGrid(tuple(plan["shape"]), plan["tile"], plan["halo"], plan["z_block"])


def anisotropy(plan: dict[str, Any]) -> float:
    """z spacing / yx spacing of the volume (NGFF scale of level 0; 1.0 for plans without it)."""
    z, y, x = plan.get("voxel_size") or (1.0, 1.0, 1.0)
    yx = (y + x) / 2
    return float(z / yx) if z > 0 and yx > 0 else 1.0


def open_volume(plan: dict[str, Any], channel: Any) -> Volume3D:
    img = open_field(plan["input"], "")
    return Volume3D(img, img.channel_index(channel))


def scratch_path(cfg: dict[str, Any]) -> str:
    return os.path.abspath(os.path.join(cfg["output"], "tmp", "volume"))


def make_volume_plan(cfg: dict[str, Any], layout: StoreLayout) -> dict[str, Any]:
    root = os.path.abspath(cfg["input"])
    img = open_field(root, "")
    vol = Volume3D(img, img.channel_index(cfg["channel"]))
    v = cfg["volume"]
    if cfg["tiling"]["halo"] > cfg["tiling"]["tile"]:
        raise InputError(f"tiling.halo ({cfg['tiling']['halo']}) is larger than tiling.tile ({cfg['tiling']['tile']}); "
                         "for volumes a tile's halo may only reach its direct neighbours. Lower the halo.")
    grid = VolumeGrid(vol.shape, cfg["tiling"]["tile"], cfg["tiling"]["halo"], v["z_block"])
    pred = os.path.abspath(cfg["predictions"]) if cfg.get("predictions") else None
    if pred:
        arr = read_volume_maps(pred)
        if tuple(arr.shape) != (3, *vol.shape):
            raise InputError(f"predictions at {pred}/0 have shape {tuple(arr.shape)}, expected {(3, *vol.shape)} "
                             f"for the volume {root}: they were computed for other data.")
    names = img.axis_names
    voxel = [float(img.scale(0)[names.index(a)]) for a in "zyx"]
    lab_root = os.path.abspath(cfg["labels"]["store"] or root)
    ratios = level_ratios(img)
    aligned = all(grid.tile % r == 0 for r in ratios)
    n = v["blocks_per_job"]
    if not aligned:  # coarser label chunks would straddle tiles: jobs take whole slabs, as before
        n = -(-n // grid.n_tiles) * grid.n_tiles
    n_blocks = grid.n_slabs * grid.n_tiles
    batches = {f"b{i // n:05d}": [i, min(i + n, n_blocks)] for i in range(0, n_blocks, n)}
    return {"input": root, "kind": "volume", "version": layout.version, "zarr_format": layout.zarr_format,
            "shape": list(vol.shape), "dtype": str(vol.dtype), "voxel_size": voxel, "tile": grid.tile,
            "halo": grid.halo, "z_block": grid.z_block, "n_slabs": grid.n_slabs, "n_tiles": grid.n_tiles,
            "predictions_root": pred, "labels_root": lab_root,
            "labels": os.path.join(lab_root, "labels", cfg["labels"]["name"]), "scratch": scratch_path(cfg),
            "label_chunks": [[grid.tile // r] * 2 if aligned else [grid.tile] * 2 for r in ratios],
            "batches": batches}


def level_ratios(img: Any) -> list[int]:
    """The yx downsampling factor of every image level over level 0 (rounded; 1 for level 0)."""
    names = img.axis_names
    s0 = img.scale(0)
    iy = names.index("y")
    return [max(1, int(round(img.scale(k)[iy] / s0[iy]))) for k in range(img.n_levels)]


def batch_blocks(plan: dict[str, Any], batch: str) -> list[tuple[int, int]]:
    """The (slab, tile) blocks of ``batch``, in id order."""
    start, stop = plan["batches"][batch]
    return [divmod(i, plan["n_tiles"]) for i in range(start, stop)]


def batch_of_block(plan: dict[str, Any], s: int, t: int) -> str:
    """The batch holding block (s, t) (batches are equal ranges of flat block indices, the last shorter)."""
    first = next(iter(plan["batches"].values()))
    n = first[1] - first[0]
    i = (s * plan["n_tiles"] + t) // n
    return f"b{i:05d}"


def edge_inputs(plan: dict[str, Any], batch: str, reach: int) -> list[str]:
    """The pass-1 batches whose blocks the edge job of ``batch`` reads: its own, the tiles its yx pairs
    reach (higher-numbered neighbours) and the slabs its z overlaps reach (``reach`` slices past a slab)."""
    start, stop = plan["batches"][batch]
    first = next(iter(plan["batches"].values()))
    need = plan_grid(plan).evidence_reads_range(start, stop, reach) // (first[1] - first[0])
    return [f"b{int(i):05d}" for i in np.unique(need)]


def create_volume_stores(cfg: dict[str, Any], plan: dict[str, Any]) -> None:
    """The label image (all levels, NGFF metadata) and the scratch array of per-unit piece ids."""
    img = open_field(plan["input"], "")
    if cfg["labels"]["store"]:  # the store's root is a placeholder of the volume (io/ngff.py)
        parent = mirror_plate(describe_store(plan["input"]), plan["labels_root"], placeholders=True)
        source = plan["input"]
    else:
        parent = open_group(plan["input"], mode="a")
        source = "../../"
    create_label_image(parent, img, cfg["labels"]["name"], chunks=(plan["tile"],) * 2, overwrite=True,
                       source=source, level_chunks=plan.get("label_chunks"))
    os.makedirs(os.path.join(plan["scratch"], "blocks"), exist_ok=True)
    t = plan["tile"]
    zarr.create_array(os.path.join(plan["scratch"], "pieces.zarr"), shape=tuple(plan["shape"]), dtype="uint32",
                      chunks=(1, min(t, plan["shape"][1]), min(t, plan["shape"][2])), fill_value=0,
                      overwrite=True)
