"""Run the SAM image encoder and the instance decoder over tiles of many fields, in batches.

Tiles of all fields of a job form one stream: CPU preprocessing runs ahead in a thread while the device
encodes the previous batch, so the GPU is not idle between fields. Each tile's maps are resampled to the
tile's size and only its inner region is written, so the stitched maps equal those of micro-sam's tiled
prediction (same tiles, same per-tile normalisation).
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..models.loading import SamModel
from ..tiling import Block, block_grid
from .preprocess import encoder_input, input_size, normalize_and_pad


@dataclass
class FieldTask:
    """One 2D image to predict: ``image[region]`` reads pixels, ``out`` (3, Y, X) receives the maps."""

    key: str
    image: Any
    out: Any
    value_range: tuple[float, float] | None = None


@dataclass
class _Tile:
    task: FieldTask
    block: Block
    pixels: np.ndarray  # resized uint8 RGB encoder input


def field_value_range(image: Any, tile: int = 2048) -> tuple[float, float]:
    """(min, max) of a 2D image, read tile by tile."""
    lo, hi = np.inf, -np.inf
    for b in block_grid(image.shape, tile):
        x = np.asarray(image[b.inner])
        if x.dtype.kind == "f":
            x = x[np.isfinite(x)]  # NaN / inf are left out (and encoded as 0)
        if x.size:
            lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    return lo, hi


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _tiles(tasks: Iterable[FieldTask], tile: int, halo: int) -> Iterator[tuple[FieldTask, Block]]:
    for task in tasks:
        for blk in block_grid(task.image.shape, tile, halo):
            yield task, blk


def _prepare(task: FieldTask, blk: Block) -> _Tile:
    pixels = np.asarray(task.image[blk.outer])
    return _Tile(task, blk, encoder_input(pixels, task.value_range))


def _batches(items: Iterator[tuple[FieldTask, Block]], batch_size: int, pool: ThreadPoolExecutor,
             prefetch: int = 2) -> Iterator[list[_Tile]]:
    """Preprocessed batches, with up to ``prefetch`` batches prepared ahead on CPU threads."""
    pending: list[list] = []
    exhausted = False
    while True:
        while not exhausted and len(pending) < prefetch + 1:
            chunk = []
            for _ in range(batch_size):
                try:
                    chunk.append(pool.submit(_prepare, *next(items)))
                except StopIteration:
                    exhausted = True
                    break
            if chunk:
                pending.append(chunk)
        if not pending:
            return
        yield [f.result() for f in pending.pop(0)]


#: Activation memory of one instance-decoder call (512 MiB): the tiles of an encoder batch go through the decoder
#: in sub-batches estimated to stay under it (at least one tile). The decoder works at the encoder input
#: resolution (1024 x 1024), where each tile holds about ten float32 tensors of ``initial_features`` channels
#: (measured: 36 bytes per feature and pixel for the tiny decoder, i.e. 300 MB per tile); a batch of 8 tiles
#: at once held 2.7 GB on the CPU. Tiles are decoded independently, so the split changes no arithmetic.
DECODER_BYTES = 2**29
DECODER_BYTES_PER_FEATURE_PX = 40


def decoder_tiles(model: SamModel) -> int:
    """Tiles per instance-decoder call under ``DECODER_BYTES``."""
    dec = model.decoder
    size = getattr(dec, "_img_size", 1024)
    per_tile = DECODER_BYTES_PER_FEATURE_PX * getattr(dec, "initial_features", 64) * size * size
    return max(1, DECODER_BYTES // per_tile)


def _decode_and_place(model: SamModel, emb: torch.Tensor, batch: list[_Tile], precision: str,
                      write: Callable[[_Tile, np.ndarray], None]) -> None:
    """Decoder maps of a batch's embeddings, in sub-batches of ``decoder_tiles``, placed by ``write``."""
    step = decoder_tiles(model)
    for i in range(0, len(batch), step):
        with _autocast(model.device, precision):
            raw = model.decoder.forward_features(emb[i:i + step])
        _place_maps(model, raw.float(), batch[i:i + step], write)


def _place_maps(model: SamModel, raw: torch.Tensor, batch: list[_Tile],
                write: Callable[[_Tile, np.ndarray], None]) -> None:
    """Resample decoder outputs to each tile's size (grouped by size, as torch-em's postprocess_masks)."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(batch):
        groups.setdefault(t.block.outer_shape, []).append(i)
    for original, idx in groups.items():
        maps = model.decoder.resample(raw[idx], input_size(original), original).cpu().numpy()
        for j, i in enumerate(idx):
            write(batch[i], maps[j])


@torch.no_grad()
def embed_tasks(model: SamModel, tasks: Sequence[FieldTask], tile: int = 512, halo: int = 64, batch_size: int = 8,
                precision: str = "fp32", with_maps: bool = True
                ) -> list[tuple[list[Block], torch.Tensor, np.ndarray | None]]:
    """Per task: tile embeddings (T, C, 64, 64, on the device, ``block_grid`` order) and, with ``with_maps``,
    its float32 decoder maps (3, Y, X) held in memory (also written to ``task.out`` if it is set).

    Tiles of all tasks share encoder batches (e.g. the slices of a volume block). For APG/AMG, which
    decode prompts against the embeddings of a whole field.
    """
    device = model.device
    index = {id(t): i for i, t in enumerate(tasks)}
    blocks = [block_grid(t.image.shape, tile, halo) for t in tasks]
    maps = [np.zeros((3,) + tuple(t.image.shape), np.float32) if with_maps else None for t in tasks]
    embs: list[list[torch.Tensor]] = [[] for _ in tasks]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for batch in _batches(_tiles(tasks, tile, halo), batch_size, pool):
            x = normalize_and_pad([t.pixels for t in batch], device)
            with _autocast(device, precision):
                emb = model.sam.image_encoder(x)
            if with_maps:
                _decode_and_place(model, emb, batch, precision, lambda t, m: maps[index[id(t.task)]].__setitem__(
                    (slice(None),) + t.block.inner, m[(slice(None),) + t.block.inner_local]))
            emb = emb.float()
            for k, t in enumerate(batch):
                embs[index[id(t.task)]].append(emb[k:k + 1])
    out = []
    for i, task in enumerate(tasks):
        if with_maps and task.out is not None:
            task.out[...] = maps[i].astype(np.float16)
        out.append((blocks[i], torch.cat(embs[i]), maps[i]))
    return out


def embed_field(model: SamModel, task: FieldTask, tile: int = 512, halo: int = 64, batch_size: int = 8,
                precision: str = "fp32", with_maps: bool = True) -> tuple[list[Block], torch.Tensor, np.ndarray | None]:
    """``embed_tasks`` for one field."""
    return embed_tasks(model, [task], tile, halo, batch_size, precision, with_maps)[0]


def prepare_field(task: FieldTask, tile: int, halo: int) -> list[_Tile]:
    """Read and preprocess every tile of one field (``block_grid`` order): the reader stage of a pipeline."""
    return [_prepare(task, blk) for blk in block_grid(task.image.shape, tile, halo)]


def _device_busy(clock):
    return clock.busy() if clock is not None else contextlib.nullcontext()


@torch.no_grad()
def embed_prepared(model: SamModel, tiles: list[_Tile], batch_size: int = 8, precision: str = "fp32",
                   with_maps: bool = True, clock=None) -> tuple[torch.Tensor, np.ndarray | None]:
    """Embeddings (T, C, 64, 64, on the device) and, with ``with_maps``, float32 maps (3, Y, X) of one
    field's prepared tiles; the same batches and arithmetic as ``embed_tasks`` for that field alone. Each
    tile's ``pixels`` are dropped once encoded.
    ``clock`` (``engine.overlap.DeviceClock``) times the device calls."""
    device = model.device
    task = tiles[0].task
    maps = np.zeros((3,) + tuple(task.image.shape), np.float32) if with_maps else None
    embs = []
    for i in range(0, len(tiles), batch_size):
        batch = tiles[i:i + batch_size]
        with _device_busy(clock):
            x = normalize_and_pad([t.pixels for t in batch], device)
            for t in batch:  # encoded: a block of many tiles does not hold every tile's input to the end
                t.pixels = None
            with _autocast(device, precision):
                emb = model.sam.image_encoder(x)
            if with_maps:
                _decode_and_place(model, emb, batch, precision, lambda t, m: maps.__setitem__(
                    (slice(None),) + t.block.inner, m[(slice(None),) + t.block.inner_local]))
            embs.append(emb.float())
    return torch.cat(embs), maps


def predict_stages(model: SamModel, tile: int = 512, halo: int = 64, precision: str = "fp32",
                   failed: dict[str, str] | None = None, clock=None,
                   progress: Callable[[int], None] | None = None) -> list[tuple[str, Callable]]:
    """The stages of ``predict_maps`` for ``engine.overlap.run_pipeline`` over batches of (task, block):
    read + preprocess, device (encoder, decoder, resampling), write of the inner regions.

    A tile that cannot be read or written fails its field (``failed[key] = message``); the field's other
    tiles are skipped and the other fields go on.
    """
    failed = {} if failed is None else failed
    from ..io.ome_zarr import InputError

    def read(items: list[tuple[FieldTask, Block]]) -> list[_Tile]:
        out = []
        for task, blk in items:
            if task.key in failed:
                continue
            try:
                out.append(_prepare(task, blk))
            except (InputError, OSError) as e:
                failed[task.key] = str(e)
        return out

    def device_stage(batch: list[_Tile]) -> list[tuple[_Tile, np.ndarray]]:
        if not batch:
            return []
        placed = []
        with _device_busy(clock):
            x = normalize_and_pad([t.pixels for t in batch], model.device)
            with _autocast(model.device, precision):
                emb = model.sam.image_encoder(x)
            _decode_and_place(model, emb, batch, precision, lambda t, m: placed.append(
                (t, m[(slice(None),) + t.block.inner_local].astype(np.float16))))
        return placed

    def write(placed: list[tuple[_Tile, np.ndarray]]) -> int:
        for t, m in placed:
            if t.task.key in failed:
                continue
            try:
                t.task.out[(slice(None),) + t.block.inner] = m
            except (OSError, ValueError) as e:
                failed[t.task.key] = f"{t.task.key}: could not write predictions ({type(e).__name__}: {e})"
        if progress:
            progress(len(placed))
        return len(placed)

    return [("read", read), ("device", device_stage), ("write", write)]


def tile_batches(tasks: Iterable[FieldTask], tile: int, halo: int, batch_size: int) -> Iterator[list]:
    """(task, block) pairs of all tasks in ``batch_size`` chunks, as ``predict_maps`` batches them."""
    chunk: list = []
    for item in _tiles(tasks, tile, halo):
        chunk.append(item)
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@torch.no_grad()
def predict_maps(model: SamModel, tasks: Sequence[FieldTask], tile: int = 512, halo: int = 64,
                 batch_size: int = 8, precision: str = "fp32",
                 progress: Callable[[int], None] | None = None) -> int:
    """Predict (foreground, center distance, boundary distance) for every task; returns the tile count."""
    if model.decoder is None:
        raise ValueError(f"model '{model.name}' has no instance-segmentation decoder; decoder maps need one.")
    device = model.device
    n = 0
    with ThreadPoolExecutor(max_workers=2) as pool:
        for batch in _batches(_tiles(tasks, tile, halo), batch_size, pool):
            x = normalize_and_pad([t.pixels for t in batch], device)
            with _autocast(device, precision):
                emb = model.sam.image_encoder(x)
            _decode_and_place(model, emb, batch, precision, lambda t, m: t.task.out.__setitem__(
                (slice(None),) + t.block.inner, m[(slice(None),) + t.block.inner_local].astype(np.float16)))
            n += len(batch)
            if progress:
                progress(len(batch))
    return n
