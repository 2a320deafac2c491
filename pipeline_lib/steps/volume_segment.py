"""Pass 1 over a volume: 2D instance segmentation of every slice x tile (with halo) of a batch of blocks.

Per block (one slab x one tile) the job writes the inner labels (*pieces*, ids 1..n per slice) into the
scratch array, and into ``blocks/<block>.npz`` the tile's labels inside each neighbour's inner region (the
halo strips the stitching compares) plus the piece counts. The batch's JSON marker is written last.
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import zarr

from ..config import ais_params
from ..engine.runner import failed, run_units
from ..instances.ais import ais_single
from ..instances.ais3d import ais_stack, z_halo
from ..io.ome_zarr import read_region, write_atomic, write_json_atomic
from ..io.volume import Volume3D, read_volume_maps
from ..stitch.tile_match import intersect, local, split_unit
from ..stitch.volume_grid import VolumeGrid
from .volume_plan import anisotropy, batch_blocks, open_volume, plan_grid


class SliceSegmenter:
    """2D labels (consecutive ids per slice) of a stack of slice crops, with the configured method.

    AIS from given ``predictions`` needs no model. Otherwise the crops of one block share encoder batches.
    AIS with ``volume.instances: stack`` (:mod:`instances.ais3d`) reads the maps of ``z_halo`` slices
    above and below the block as well (from the predictions, or encoded with the block's slices).
    """

    def __init__(self, cfg: dict[str, Any], volume: Volume3D, maps: Any, model_info: dict[str, Any] | None,
                 anisotropy: float = 1.0):
        self.cfg = cfg
        self.method = cfg["method"]
        self.volume = volume
        self.maps = maps
        self.ais = ais_params(cfg) if self.method == "ais" else None
        self.stack = self.method == "ais" and cfg["volume"]["instances"] == "stack"
        self.anisotropy = anisotropy
        self.z_halo = z_halo(self.ais, anisotropy) if self.stack else 0
        self.model = self.decoder = None
        if not (self.method == "ais" and maps is not None):
            from ..embed.prompt_decoder import PromptDecoder
            from .model import load_resolved
            self.model = load_resolved(model_info, cfg["model"]["device"],
                                       require_decoder=self.method in ("ais", "apg") and maps is None)
            self.decoder = PromptDecoder(self.model.sam) if self.method != "ais" else None

    @property
    def device(self) -> str:
        return str(self.model.device) if self.model is not None else "cpu"

    def _maps(self, z: int, region: tuple[slice, slice]) -> np.ndarray:
        region = tuple(region)
        return read_region(self.maps, (slice(None), z) + region, f"{self.maps.store} (maps of slice {z})",
                           region).astype(np.float32)

    def _stack_maps(self, z0: int, z1: int, region: tuple[slice, slice]) -> np.ndarray:
        """(3, z1 - z0, h, w) float32 maps of slices z0..z1-1: read from the predictions or encoded."""
        region = tuple(region)
        if self.model is None:
            return read_region(self.maps, (slice(None), slice(z0, z1)) + region,
                               f"{self.maps.store} (maps of slices {z0}..{z1 - 1})", region).astype(np.float32)
        from ..embed.predict import FieldTask, embed_tasks  # torch only where a model runs
        shape = tuple(s.stop - s.start for s in region)
        tasks = [FieldTask(f"z{z}", self.volume[(z,) + region], None) for z in range(z0, z1)]
        enc = self.cfg["encoder"]
        embedded = embed_tasks(self.model, tasks, max(shape), 0, enc["batch_size"], enc["precision"], True)
        return np.stack([np.asarray(maps, np.float32) for _, _, maps in embedded], axis=1)

    def block(self, z0: int, z1: int, region: tuple[slice, slice]) -> np.ndarray:
        """(z1 - z0, h, w) uint32 labels of the slices' crops ``region`` (ids start at 1 in every slice)."""
        shape = tuple(s.stop - s.start for s in region)
        if self.stack:
            a, b = max(0, z0 - self.z_halo), min(self.volume.shape[0], z1 + self.z_halo)
            return ais_stack(self._stack_maps(a, b, region), self.ais, self.anisotropy)[z0 - a:z1 - a]
        out = np.zeros((z1 - z0, *shape), dtype=np.uint32)
        if self.model is None:
            for k, z in enumerate(range(z0, z1)):
                out[k] = ais_single(self._maps(z, region), self.ais)
            return out
        from ..embed.predict import FieldTask, embed_tasks  # torch only where a model runs
        from .prompt_segment import prompt_labels
        tasks = [FieldTask(f"z{z}", self.volume[(z,) + tuple(region)], None) for z in range(z0, z1)]
        with_maps = self.method in ("ais", "apg") and self.maps is None
        enc = self.cfg["encoder"]
        embedded = embed_tasks(self.model, tasks, max(shape), 0, enc["batch_size"], enc["precision"], with_maps)
        for k, (z, (blocks, emb, maps)) in enumerate(zip(range(z0, z1), embedded)):
            if maps is None and self.method != "amg":
                maps = self._maps(z, region)
            if self.method == "ais":
                out[k] = ais_single(maps, self.ais)
            else:
                out[k] = prompt_labels(self.cfg, self.decoder, blocks, emb, maps, shape, max(shape))[0]
        return out


def block_path(plan: dict[str, Any], name: str) -> str:
    return os.path.join(plan["scratch"], "blocks", f"{name}.npz")


def write_block(plan: dict[str, Any], grid: VolumeGrid, scratch: Any, s: int, t: int,
                labels: np.ndarray | None) -> list[int]:
    """Store one block's pieces and halo strips; ``labels`` None (a failed block) stores empty ones."""
    z0, z1 = grid.slab(s)
    tile = grid.tiles[t]
    if labels is None:
        labels = np.zeros((z1 - z0, *tile.outer_shape), dtype=np.uint32)
    pieces = np.zeros((z1 - z0, *tile.inner_shape), dtype=np.uint32)
    rings = np.zeros_like(labels)
    counts = []
    for k in range(z1 - z0):
        pieces[k], rings[k], n = split_unit(labels[k], tile.inner_local)
        counts.append(n)
    strips = {}
    for j in grid.neighbours(t):
        reg = intersect(tile.outer, grid.tiles[j].inner)
        if reg is not None:
            strips[f"to_{j}"] = rings[(slice(None),) + local(reg, tile.outer)]
    scratch[(slice(z0, z1),) + tile.inner] = pieces
    write_atomic(block_path(plan, grid.block_name(s, t)),
                 lambda p: np.savez_compressed(p, counts=np.asarray(counts, np.int64), **strips))
    return counts


def run_volume_segment_batch(cfg: dict[str, Any], plan: dict[str, Any], batch: str,
                             model_info: dict[str, Any] | None, out_json: str, segmenter: Any = None) -> dict[str, Any]:
    """Pass 1 for the blocks of ``batch``; a block that fails (e.g. a corrupt chunk) is reported by name and
    left empty, the other blocks finish. ``segmenter`` (benchmarks: e.g. ground-truth slices) replaces the
    configured one; it needs ``block(z0, z1, region)`` and ``device``."""
    grid = plan_grid(plan)
    if segmenter is None:
        maps = read_volume_maps(plan["predictions_root"]) if plan["predictions_root"] else None
        segmenter = SliceSegmenter(cfg, open_volume(plan, cfg["channel"]), maps, model_info, anisotropy(plan))
    seg = segmenter
    scratch = zarr.open_array(os.path.join(plan["scratch"], "pieces.zarr"), mode="r+")
    todo = batch_blocks(plan, batch)

    def work(st: tuple[int, int]) -> dict[str, Any]:
        t0 = time.time()
        labels = seg.block(*grid.slab(st[0]), grid.tiles[st[1]].outer)
        counts = write_block(plan, grid, scratch, *st, labels)
        return {"status": "ok" if sum(counts) else "empty", "counts": counts, "seconds": round(time.time() - t0, 3)}

    def on_error(st: tuple[int, int], err: str) -> dict[str, Any]:
        counts = write_block(plan, grid, scratch, *st, None)
        return failed(err, counts=counts, z=list(grid.slab(st[0])),
                      yx=[[sl.start, sl.stop] for sl in grid.tiles[st[1]].inner])

    blocks = run_units([(grid.block_name(*st), st) for st in todo], work,
                       f"segment slices {batch} ({seg.device})", unit="block", on_error=on_error)
    result = {"batch": batch, "device": seg.device, "method": cfg["method"], "blocks": blocks}
    write_json_atomic(out_json, result)
    return result
