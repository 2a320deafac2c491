"""Pass 1 over a volume: 2D instance segmentation of every slice x tile (with halo) of a batch of blocks.

Per block (one slab x one tile) the job writes the inner labels (*pieces*, ids 1..n per slice) into the
scratch array, and into ``blocks/<block>.npz`` the tile's labels inside each neighbour's inner region (the
halo strips the stitching compares) plus the piece counts. The batch's JSON marker is written last.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import numpy as np
import zarr

from ..engine.runner import failed
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
        self.clock = None  # engine.overlap.DeviceClock of the job, set by run_volume_segment_batch
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

    def _crops(self, z0: int, z1: int, region: tuple[slice, slice]) -> np.ndarray:
        """(z1 - z0, h, w) float32 image crops of slices z0..z1-1 (read stage)."""
        return np.stack([np.asarray(self.volume[(z,) + tuple(region)], np.float32) for z in range(z0, z1)])

    def _given_maps(self, z0: int, z1: int, region: tuple[slice, slice]) -> np.ndarray:
        """(3, z1 - z0, h, w) float32 maps of slices z0..z1-1 from the given predictions."""
        region = tuple(region)
        return read_region(self.maps, (slice(None), slice(z0, z1)) + region,
                           f"{self.maps.store} (maps of slices {z0}..{z1 - 1})", region).astype(np.float32)

    def read(self, z0: int, z1: int, region: tuple[slice, slice]) -> dict[str, Any]:
        """Read stage of one block (CPU, I/O): the slice crops the network needs and the given maps."""
        st: dict[str, Any] = {"z": (z0, z1), "region": tuple(region),
                              "shape": tuple(s.stop - s.start for s in region)}
        a, b = (max(0, z0 - self.z_halo), min(self.volume.shape[0], z1 + self.z_halo)) if self.stack else (z0, z1)
        st["zr"] = (a, b)
        if self.model is not None or self.net is not None:
            st["crops"] = self._crops(a, b, region)
        if self.maps is not None and (self.model is None or self.spec.store is not None) and self.net is None:
            st["maps"] = self._given_maps(a, b, region)
        return st

    def network(self, st: dict[str, Any]) -> dict[str, Any]:
        """Device stage of one block: the encoder (+ decoder maps) or Cellpose's network on its slice crops
        (the crops of a block share batches); nothing for maps given as predictions."""
        crops = st.pop("crops", None)
        if crops is None:
            return st
        with self._busy():
            if self.net is not None:
                from ..embed.cellpose_net import FlowTask, predict_flows
                c = self.cfg["cellpose"]
                tasks = [FlowTask(f"z{k}", crop, np.zeros((3, *crop.shape), np.float16), self.lowhigh())
                         for k, crop in enumerate(crops)]
                predict_flows(self.net, tasks, c["halo"], c["batch_size"])
                st["maps"] = np.stack([t.out.astype(np.float32) for t in tasks], axis=1)
                return st
            from ..embed.predict import FieldTask, embed_tasks  # torch only where a model runs
            with_maps = self.spec.store == "sam_maps" and self.maps is None
            enc = self.cfg["encoder"]
            tasks = [FieldTask(f"z{k}", crop, None) for k, crop in enumerate(crops)]
            embedded = embed_tasks(self.model, tasks, max(st["shape"]), 0, enc["batch_size"], enc["precision"],
                                   with_maps)
        if with_maps:
            st["maps"] = np.stack([np.asarray(maps, np.float32) for _, _, maps in embedded], axis=1)
        if self.decoder is not None:  # prompt methods decode against the tile embeddings in the next stage
            st["embedded"] = [(blocks, emb) for blocks, emb, _ in embedded]
        return st

    def labels(self, st: dict[str, Any]) -> np.ndarray:
        """Instance stage of one block: (z1 - z0, h, w) uint32 labels (ids start at 1 in every slice)."""
        (z0, z1), (a, _) = st["z"], st["zr"]
        maps = st.get("maps")
        if self.stack:
            return ais_stack(maps, self.params, self.anisotropy)[z0 - a:z1 - a]
        out = np.zeros((z1 - z0, *st["shape"]), dtype=np.uint32)
        for k in range(z1 - z0):
            m = None if maps is None else maps[:, k]
            if self.slice_labels is not None:
                out[k] = self.slice_labels(m, self.params)
            else:
                from .prompt_segment import prompt_labels  # torch only where a model runs
                blocks, emb = st["embedded"][k]
                out[k] = prompt_labels(self.cfg, self.decoder, blocks, emb, m, st["shape"], max(st["shape"]),
                                       self.clock)[0]
        return out

    def _busy(self):
        return self.clock.busy() if self.clock is not None else contextlib.nullcontext()

    def block(self, z0: int, z1: int, region: tuple[slice, slice]) -> np.ndarray:
        """(z1 - z0, h, w) uint32 labels of the slices' crops ``region``: the three stages in turn."""
        return self.labels(self.network(self.read(z0, z1, region)))

    def stages(self) -> list[tuple[str, Any]]:
        """(name, f(st) -> st) of the read, device and instance stages, for ``engine.overlap``."""
        return [("read", lambda st: self.read(*st)), ("device", self.network), ("instances", self.labels)]


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
                             model_info: dict[str, Any] | None, out_json: str, segmenter: Any = None,
                             overlap: bool = True) -> dict[str, Any]:
    """Pass 1 for the blocks of ``batch``; a block that fails (e.g. a corrupt chunk) is reported by name and
    left empty, the other blocks finish. ``segmenter`` (benchmarks: e.g. ground-truth slices) replaces the
    configured one; it needs ``block(z0, z1, region)`` and ``device`` (and may give ``stages()``).

    Blocks flow through the bounded stage pipeline of ``engine.overlap`` (read the next block's crops,
    run the network on the current one, make the labels of the previous one, write the one before), so the
    device does not wait for reads, instances and writes; ``overlap=False`` runs the stages block by block.
    The device-busy fraction and the stage split go into the marker (``timing``) and the log."""
    from ..engine.overlap import DeviceClock, StageTimes, run_staged_units, timing_line
    grid = plan_grid(plan)
    if segmenter is None:
        maps = read_volume_maps(plan["predictions_root"]) if plan["predictions_root"] else None
        segmenter = SliceSegmenter(cfg, open_volume(plan, cfg["channel"]), maps, model_info, anisotropy(plan))
    seg = segmenter
    clock, times = DeviceClock(seg.device), StageTimes()
    if hasattr(seg, "clock"):
        seg.clock = clock
    scratch = zarr.open_array(os.path.join(plan["scratch"], "pieces.zarr"), mode="r+")
    todo = batch_blocks(plan, batch)
    inner = seg.stages() if hasattr(seg, "stages") else [("segment", lambda st: seg.block(*st))]

    def at(st: tuple[int, int]) -> tuple[int, int, tuple[slice, slice]]:
        return (*grid.slab(st[0]), grid.tiles[st[1]].outer)

    def write(st: tuple[int, int], labels: np.ndarray) -> dict[str, Any]:
        counts = write_block(plan, grid, scratch, *st, labels)
        return {"status": "ok" if sum(counts) else "empty", "counts": counts}

    def on_error(st: tuple[int, int], err: str) -> dict[str, Any]:
        counts = write_block(plan, grid, scratch, *st, None)
        return failed(err, counts=counts, z=list(grid.slab(st[0])),
                      yx=[[sl.start, sl.stop] for sl in grid.tiles[st[1]].inner])

    blocks = run_staged_units([(grid.block_name(*st), st) for st in todo], at, inner, write,
                              f"segment slices {batch} ({seg.device})", unit="block", on_error=on_error,
                              threaded=overlap, times=times, max_in_flight=3)
    timing = {**clock.report(times), "overlap": overlap}
    print(timing_line(f"segment slices {batch}", timing), file=sys.stderr)
    result = {"batch": batch, "device": seg.device, "method": cfg["method"], "timing": timing, "blocks": blocks}
    write_json_atomic(out_json, result)
    return result
