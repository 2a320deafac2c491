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

from ..engine.runner import failed, run_units
from ..instances.ais3d import ais_stack, z_halo
from ..io.ome_zarr import read_region, write_atomic, write_json_atomic
from ..io.volume import Volume3D, read_volume_maps
from ..methods import get_method
from ..stitch.tile_match import intersect, local, split_unit
from ..stitch.volume_grid import VolumeGrid
from .volume_plan import anisotropy, batch_blocks, open_volume, plan_grid


class SliceSegmenter:
    """2D labels (consecutive ids per slice) of a stack of slice crops, with the configured method.

    AIS from given ``predictions`` needs no model. Otherwise the crops of one block share encoder batches.
    AIS with ``volume.instances: stack`` (:mod:`instances.ais3d`) reads the maps of ``z_halo`` slices
    above and below the block as well (from the predictions, or encoded with the block's slices).
    Cellpose-SAM runs its network on each slice crop (normalised with the volume's 1/99 percentiles, as
    cellpose normalises a stack) and cellpose's masks on the crop's flows. The method's parts come from
    ``methods.get_method`` (``slice_instances``, ``stack_instances``, ``network``, ``chain``).
    """

    def __init__(self, cfg: dict[str, Any], volume: Volume3D, maps: Any, model_info: dict[str, Any] | None,
                 anisotropy: float = 1.0):
        self.cfg = cfg
        self.spec = spec = get_method(cfg)
        self.method = spec.name
        self.volume = volume
        self.maps = maps
        # maps -> 2D labels (methods.Method.slice_instances, e.g. AIS) for the predict -> segment chain
        self.params = spec.resolved_params(cfg) if spec.chain == "predict_segment" else None
        self.slice_labels = spec.step("slice_instances") if spec.chain == "predict_segment" else None
        self.stack = spec.stack_instances and cfg["volume"]["instances"] == "stack"
        self.anisotropy = anisotropy
        self.z_halo = z_halo(self.params, anisotropy) if self.stack else 0
        self.model = self.decoder = self.net = None
        self._lowhigh = None
        if spec.uses_model(cfg) and spec.network == "cellpose":
            from .cellpose import load_net
            self.net = load_net(model_info, cfg)
        elif spec.uses_model(cfg):
            from ..embed.prompt_decoder import PromptDecoder
            from .model import load_resolved
            self.model = load_resolved(model_info, cfg["model"]["device"],
                                       require_decoder=spec.store == "sam_maps" and maps is None)
            self.decoder = PromptDecoder(self.model.sam) if spec.chain == "prompt_segment" else None

    @property
    def device(self) -> str:
        net = self.model if self.model is not None else self.net
        return str(net.device) if net is not None else "cpu"

    def lowhigh(self) -> np.ndarray:
        """(1, 2) Cellpose normalisation bounds of the whole volume, as cellpose's ``normalize99`` takes them
        from a stack: 1/99 percentiles, of a strided subsample above 224**3 voxels (read once per job)."""
        if self._lowhigh is None:
            shape = self.volume.shape
            step = [max(1, n // 224) for n in shape] if np.prod(shape) > 224 ** 3 else [1, 1, 1]
            sub = np.asarray(self.volume[tuple(slice(0, n, k) for n, k in zip(shape, step))], np.float32)
            x01, x99 = np.percentile(sub, [1.0, 99.0])
            ok = sub.max() > sub.min() and x99 - x01 > 1e-3  # else cellpose sets the channel to 0
            self._lowhigh = np.array([[x01, x99] if ok else [np.nan, np.nan]])
        return self._lowhigh

    def _cellpose_block(self, z0: int, z1: int, region: tuple[slice, slice]) -> np.ndarray:
        """Cellpose-SAM per slice crop: its network on the crop's 256 x 256 tiles (the crops of a block share
        batches), then cellpose's masks on the crop's flows."""
        from ..embed.cellpose_net import FlowTask, predict_flows
        c = self.cfg["cellpose"]
        tasks = []
        for z in range(z0, z1):
            crop = np.asarray(self.volume[(z,) + tuple(region)], np.float32)
            tasks.append(FlowTask(f"z{z}", crop, np.zeros((3, *crop.shape), np.float16), self.lowhigh()))
        predict_flows(self.net, tasks, c["halo"], c["batch_size"])
        return np.stack([self.slice_labels(t.out.astype(np.float32), self.params) for t in tasks])

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
            return ais_stack(self._stack_maps(a, b, region), self.params, self.anisotropy)[z0 - a:z1 - a]
        if self.net is not None:
            return self._cellpose_block(z0, z1, region).astype(np.uint32)
        out = np.zeros((z1 - z0, *shape), dtype=np.uint32)
        if self.model is None:
            for k, z in enumerate(range(z0, z1)):
                out[k] = self.slice_labels(self._maps(z, region), self.params)
            return out
        from ..embed.predict import FieldTask, embed_tasks  # torch only where a model runs
        from .prompt_segment import prompt_labels
        tasks = [FieldTask(f"z{z}", self.volume[(z,) + tuple(region)], None) for z in range(z0, z1)]
        with_maps = self.spec.store == "sam_maps" and self.maps is None
        enc = self.cfg["encoder"]
        embedded = embed_tasks(self.model, tasks, max(shape), 0, enc["batch_size"], enc["precision"], with_maps)
        for k, (z, (blocks, emb, maps)) in enumerate(zip(range(z0, z1), embedded)):
            if maps is None and self.spec.store is not None:
                maps = self._maps(z, region)
            if self.slice_labels is not None:
                out[k] = self.slice_labels(maps, self.params)
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
