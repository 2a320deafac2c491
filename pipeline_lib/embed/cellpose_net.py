"""Cellpose-SAM's network (``cellpose.vit.CPSAM``) on our batched 256 x 256 tiles with a halo.

Per field the intensities are normalised once, with the field's own percentiles, exactly as cellpose's
default ``normalize_img`` does it: per channel, 0 at the 1st and 1 at the 99th percentile
(``normalize99``: float32, percentiles of a strided subsample above 224**3 pixels, a channel with
``x99 - x01 <= 1e-3`` or no range at all becomes 0). The field is cut into tiles whose *inner* region
(``tile - 2 * halo``) is written and whose 256 x 256 window reaches ``halo`` pixels beyond it (zeros outside
the field, as cellpose pads its input with zeros). Tiles of all fields of a job share batches. Each tile's
inner region of ``(dY, dX, cellprob)`` is stored as float16 into a (3, Y, X) target, e.g. a zarr array of
``predictions.ome.zarr``, so the mask step can rerun without a GPU.

Differences to ``CellposeModel.eval``: cellpose pads the whole image by >= 8 px and averages overlapping
tiles with a taper mask (``tile_overlap=0.1``); we keep each tile's inner region (no blending, reproducible
per tile). An axis of at most 240 pixels is one window placed as cellpose places it (``get_pad_yx``), so a
field of up to 240 x 240 gives exactly cellpose's ``run_net`` output. Input rescaling by ``diameter`` is not
done here (cellpose 4 does none by default).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import product
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..tiling import Block

TILE = 256  # cpsam's input size (its position embedding); cellpose refuses other sizes for cpsam
_PAD = 8  # cellpose's minimum zero border (get_pad_yx: div=16, extra=1)


@dataclass
class FlowTask:
    """One field: ``image[region]`` reads (Y, X) or (C, Y, X) pixels, ``out`` (3, Y, X) receives the flows.
    ``lowhigh`` (C, 2): the normalisation bounds; None computes the field's 1/99 percentiles."""

    key: str
    image: Any
    out: Any
    lowhigh: np.ndarray | None = None


@dataclass(frozen=True)
class NetTile:
    block: Block  # inner: what the tile writes; outer: the field pixels its window reads
    origin: tuple[int, int]  # field coordinates of the window's top-left pixel (negative: zero padding)


def _read(image: Any, region: tuple[slice, slice]) -> np.ndarray:
    """(C, h, w) float32 pixels of ``region``."""
    x = np.asarray(image[(slice(None),) * (image.ndim - 2) + tuple(region)], dtype=np.float32)
    return x[None] if x.ndim == 2 else x


def field_lowhigh(image: Any, lower: float = 1.0, upper: float = 99.0, read_tile: int = 4096) -> np.ndarray:
    """(C, 2) normalisation bounds as ``cellpose.transforms.normalize_img`` computes them; a channel that
    cellpose sets to 0 (no range, or ``x99 - x01 <= 1e-3``) gets ``nan``."""
    Y, X = image.shape[-2:]
    n = Y * X
    if n > 224 ** 3:  # normalize99(downsample=True): strided subsample of the channel
        sy, sx = max(1, Y // 224), max(1, X // 224)
        sub = _read(image, (slice(0, Y, sy), slice(0, X, sx)))
    else:
        sub = _read(image, (slice(0, Y), slice(0, X)))
    lo = np.full(sub.shape[0], np.inf, np.float32)
    hi = np.full(sub.shape[0], -np.inf, np.float32)
    for y0 in range(0, Y, read_tile):  # np.ptp over the whole channel, read in bands
        band = _read(image, (slice(y0, min(y0 + read_tile, Y)), slice(0, X))) if n > 224 ** 3 else \
            sub[:, y0:y0 + read_tile]
        lo, hi = np.minimum(lo, band.min(axis=(1, 2))), np.maximum(hi, band.max(axis=(1, 2)))
    out = np.full((sub.shape[0], 2), np.nan)
    for c in range(sub.shape[0]):
        x01, x99 = np.percentile(sub[c], lower), np.percentile(sub[c], upper)
        if hi[c] > lo[c] and x99 - x01 > 1e-3:
            out[c] = x01, x99
    return out


def normalize_tile(x: np.ndarray, lowhigh: np.ndarray) -> np.ndarray:
    """(C, h, w) float32 normalised in place with cellpose's arithmetic (``X -= x01; X /= x99 - x01``)."""
    for c in range(x.shape[0]):
        x01, x99 = lowhigh[c]
        if np.isnan(x01):
            x[c] = 0
        else:
            x[c] -= np.float32(x01)
            x[c] /= np.float32(x99 - x01)
    return x


def _axis_windows(length: int, tile: int, halo: int) -> list[tuple[slice, int]]:
    """(inner, window start) along one axis."""
    if length <= tile - 2 * _PAD:  # one window, centred as cellpose's get_pad_yx pads a small image
        return [(slice(0, length), -(_PAD + (tile - 2 * _PAD - length) // 2))]
    step = tile - 2 * halo
    return [(slice(s, min(s + step, length)), s - halo) for s in range(0, length, step)]


def net_tiles(shape: Sequence[int], tile: int = TILE, halo: int = 32) -> list[NetTile]:
    """The tiles of a (Y, X) field in C order."""
    if not 0 <= halo < tile // 2:
        raise ValueError(f"halo {halo} must be in [0, {tile // 2}) for {tile} x {tile} tiles")
    axes = [_axis_windows(int(n), tile, halo) for n in shape[-2:]]
    out = []
    for idx in product(*(range(len(a)) for a in axes)):
        (iy, oy), (ix, ox) = axes[0][idx[0]], axes[1][idx[1]]
        outer = tuple(slice(max(o, 0), min(o + tile, n)) for o, n in zip((oy, ox), shape[-2:]))
        out.append(NetTile(Block(idx, (iy, ix), outer), (oy, ox)))
    return out


def tile_input(image: Any, t: NetTile, lowhigh: np.ndarray, tile: int = TILE) -> np.ndarray:
    """The (C, tile, tile) float32 network input of one tile (normalised, zeros outside the field)."""
    x = normalize_tile(_read(image, t.block.outer), lowhigh)
    win = np.zeros((x.shape[0], tile, tile), np.float32)
    dst = tuple(slice(s.start - o, s.stop - o) for s, o in zip(t.block.outer, t.origin))
    win[(slice(None),) + dst] = x
    return win


def _batches(tasks: Sequence[FlowTask], halo: int, batch_size: int) -> Iterator[list[tuple[FlowTask, NetTile]]]:
    """The (task, tile) pairs of all tasks in network batches of ``batch_size`` (tiles of several fields
    share a batch)."""
    batch: list[tuple[FlowTask, NetTile]] = []
    for task in tasks:
        for t in net_tiles(task.image.shape, TILE, halo):
            batch.append((task, t))
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


@torch.no_grad()
def run_tiles(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """(B, 3, tile, tile) float32 outputs of cellpose's network for a (B, C, tile, tile) batch (cellpose's
    ``core._forward``: input in the network's dtype, output as float32)."""
    X = torch.from_numpy(x).to(net.device, dtype=net.dtype)
    return net(X)[0].float().cpu().numpy()


def predict_flows(net: torch.nn.Module, tasks: Sequence[FlowTask], halo: int = 32, batch_size: int = 8,
                  progress: Callable[[int], None] | None = None, clock: Any = None, times: Any = None,
                  overlap: bool = True) -> int:
    """Write (dY, dX, cellprob) float16 for every task into ``task.out``; returns the number of tiles.

    ``net``: ``models.cellpose.load_cellpose_net(...)``. Each task's ``lowhigh`` is computed first if None.
    Batches flow through ``engine.overlap.run_pipeline``: the tiles of the next batch are read and
    normalised (two CPU threads) and the flows of the previous one written while the network runs on the
    current one. ``clock`` (``DeviceClock``) times the network calls, ``times`` (``StageTimes``) the stages.
    The first error of a batch is raised (after the pipeline stopped).
    """
    import contextlib

    from ..engine.overlap import run_pipeline
    for task in tasks:
        if task.lowhigh is None:
            task.lowhigh = field_lowhigh(task.image)
    net.eval()
    busy = clock.busy if clock is not None else contextlib.nullcontext

    with ThreadPoolExecutor(max_workers=2) as pool:
        def read(batch: list) -> tuple[list, np.ndarray]:
            return batch, np.stack(list(pool.map(lambda tt: tile_input(tt[0].image, tt[1], tt[0].lowhigh), batch)))

        def device(st: tuple[list, np.ndarray]) -> tuple[list, np.ndarray]:
            with busy():
                return st[0], run_tiles(net, st[1])

        def write(st: tuple[list, np.ndarray]) -> int:
            for (task, t), yt in zip(*st):
                src = tuple(slice(s.start - o, s.stop - o) for s, o in zip(t.block.inner, t.origin))
                task.out[(slice(None),) + t.block.inner] = yt[(slice(None),) + src].astype(np.float16)
            if progress:
                progress(len(st[0]))
            return len(st[0])

        stages = [("read", read), ("device", device), ("write", write)]
        n = 0
        with contextlib.closing(run_pipeline(_batches(tasks, halo, batch_size), stages, depth=1, threaded=overlap,
                                             times=times)) as outs:
            for out in outs:
                if out.error is not None:
                    raise out.error
                n += out.value
    return n


def predict_field(net: torch.nn.Module, image: Any, halo: int = 32, batch_size: int = 8) -> np.ndarray:
    """(3, Y, X) float16 flows of one in-memory field (tests, benchmarks)."""
    out = np.zeros((3,) + tuple(image.shape[-2:]), np.float16)
    predict_flows(net, [FlowTask("field", image, out)], halo, batch_size)
    return out
