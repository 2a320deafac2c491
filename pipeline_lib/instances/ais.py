"""AIS (micro-sam's automatic instance segmentation) on decoder maps, computed block by block.

The maps are smoothed (foreground sigma 1.0, distances sigma 1.6), the foreground mask is ``fg > t_fg`` and
the seeds are connected components of ``(center < t_c) & (boundary < t_b) & mask``; the seeded watershed on
the smoothed boundary distance then runs on each block with its halo and global seed ids and writes its
inner part. Small objects are dropped and ids made consecutive with one global lookup table. Two paths:

- in memory (``scratch`` None, the segment step's fields up to 64 Mpx): smoothing, thresholds and seed
  labels run on row bands (whole planes of the first axis) on the pool, which reproduces the full-image
  values and labels bit for bit; the watershed then floods each foreground component with several seeds
  whole, on the pool (one with a single seed id is that id), so the labels are the untiled ones exactly
  and ``block``/``halo`` do not change them.
- block by block (a ``scratch`` array, for fields too large for memory): each block's maps are smoothed
  over the block plus halo (kept for the watershed pass within ``cache_bytes``), seeds are labelled per
  block and made global (compact offsets, union of components that touch across block faces).

In both, seeds are numbered by their first pixel in the field (row-major), the order of the untiled labels,
so tiled labels are the untiled ones id for id wherever the halo covers the watershed's reach (on the real
plate and the DSB mosaic of ``bench/ais.py`` at 512/64 and 128/32). With one block the labels are exactly
micro-sam's ``InstanceSegmentationWithDecoder.generate`` (same smoothing and watershed calls, one watershed
over the field's multi-seed components, which floods each component as the whole-field call does; the
labelling is scipy's, which gives ``bioimage_cpp.segmentation.label``'s ids several times faster).
Unlike micro-sam's tiled AIS, inputs are never modified (micro-sam smooths the maps in place while still
reading them), and its tiled result differs from its untiled one where ours does not.

Where the time goes (``bench/ais.py --profile``): the three Gaussians are the largest stage, then the
watershed of the multi-seed components; both are single-threaded library calls, so the speed comes from
running bands and blocks on all the job's threads (``threads``; they release the GIL), from smoothing each
map once per field and from flooding only the components that need it. The
post-processing block is the segment step's ``ais.block``, not the network tile: the maps are stitched
before AIS runs, and a watershed block with a halo costs more per pixel the smaller it is.

Option ``keep_unseeded`` (ours, off by default): foreground components that received no seed become objects
of their own. micro-sam's smoothing removes the seeds of small objects, which are then lost entirely.
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import product
from typing import Any, Callable, Sequence

import bioimage_cpp as bic
import numpy as np
import scipy.ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..tiling import Block, block_grid

CACHE_BYTES = 512 * 2**20  # smoothed block maps kept between the seed and watershed passes


@dataclass
class AISParams:
    center_distance_threshold: float = 0.5
    boundary_distance_threshold: float = 0.5
    foreground_threshold: float = 0.5
    foreground_smoothing: float = 1.0
    distance_smoothing: float = 1.6
    min_size: int = 0
    keep_unseeded: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def smoothing_reach(params: AISParams) -> int:
    """Pixels over which the Gaussians read: a halo below this would make blocks disagree."""
    return int(math.ceil(3 * max(params.foreground_smoothing, params.distance_smoothing, 0))) + 1


def _smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return bic.filters.gaussian_smoothing(x, sigma) if sigma > 0 else x


def ais_single(maps: np.ndarray, p: AISParams) -> np.ndarray:
    """Untiled AIS of one in-memory image (the reference the blockwise version must reproduce)."""
    out = np.zeros(maps.shape[1:], dtype=np.uint32)
    ais_blockwise(maps, out, p, block=maps.shape[1:], halo=0)
    return out


def _label(mask: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Connected components (full connectivity), numbered in row-major order of their first pixel: the
    labels of ``bioimage_cpp.segmentation.label`` (micro-sam's call), from scipy's, which is several times
    faster on dense masks and writes into ``out`` (an int32 or uint32 array of the mask's shape)."""
    mask = np.asarray(mask, dtype=bool)
    if out is None:
        out = np.empty(mask.shape, np.int32)
    n = ndi.label(mask, structure=np.ones((3,) * mask.ndim, bool), output=out.view(np.int32))
    return out, int(n)


def _half_offsets(ndim: int) -> list[tuple[int, ...]]:
    """Neighbour offsets of full connectivity, one of each +/- pair (lexicographically positive)."""
    offs = []
    for d in product((-1, 0, 1), repeat=ndim):
        if any(d) and next(v for v in d if v != 0) > 0:
            offs.append(d)
    return offs


class _GlobalIds:
    """Per-block local labels stored in a scratch array, read back as global ids via block offsets."""

    def __init__(self, scratch: Any, blocks: Sequence[Block], block_shape: Sequence[int]):
        self.scratch = scratch
        self.blocks = blocks
        self.block_shape = tuple(block_shape)
        self.grid = tuple(max(b.index[a] for b in blocks) + 1 for a in range(len(self.block_shape)))
        self.offsets = np.zeros(self.grid, np.int64)

    def set_counts(self, counts: dict[tuple[int, ...], int], start: int = 0) -> int:
        total = start
        for b in self.blocks:
            self.offsets[b.index] = total
            total += counts[b.index]
        return total

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        """Global ids (0 = none) over ``region``, which may span several blocks."""
        local = np.asarray(self.scratch[region]).astype(np.int64)
        off = self.offsets[np.ix_(*(np.arange(s.start, s.stop) // b for s, b in zip(region, self.block_shape)))]
        np.add(local, off, out=local, where=local > 0)
        return local

    def read_mapped(self, region: tuple[slice, ...], mapping: np.ndarray, dtype: Any) -> np.ndarray:
        """``mapping[global ids]`` over ``region`` as ``dtype``, in one gather per block it spans (through a
        per-block lookup table, so no int64 copy of the region is made)."""
        out = np.empty(tuple(s.stop - s.start for s in region), dtype)
        first = [s.start // b for s, b in zip(region, self.block_shape)]
        last = [(s.stop - 1) // b for s, b in zip(region, self.block_shape)]
        for idx in product(*(range(f, l_ + 1) for f, l_ in zip(first, last))):
            sub = tuple(slice(max(i * b, r.start), min((i + 1) * b, r.stop)) for i, b, r in
                        zip(idx, self.block_shape, region))
            local = np.asarray(self.scratch[sub])
            o = int(self.offsets[idx])
            lut = mapping[o:o + int(local.max(initial=0)) + 1].astype(dtype)
            lut[0] = 0
            out[tuple(slice(s.start - r.start, s.stop - r.start) for s, r in zip(sub, region))] = np.take(lut, local)
        return out

    def _face_regions(self, shape: Sequence[int]):
        """Slabs of two planes around every internal block face along each axis, one per grid line and block
        row (the last other axis taken whole), extended by one pixel along the other axes."""
        nd = len(shape)
        for axis in range(nd):
            full = (nd - 1 if axis != nd - 1 else nd - 2) if nd > 1 else None
            rest = [a for a in range(nd) if a not in (axis, full)]
            for line in range(1, self.grid[axis]):
                c = line * self.block_shape[axis]
                for idx in product(*(range(self.grid[a]) for a in rest)):
                    region = [slice(0, shape[a]) for a in range(nd)]
                    region[axis] = slice(c - 1, c + 1)
                    for a, i in zip(rest, idx):
                        b = self.block_shape[a]
                        region[a] = slice(max(i * b - 1, 0), min((i + 1) * b + 1, shape[a]))
                    yield tuple(region)

    def merge_edges(self, shape: Sequence[int]) -> np.ndarray:
        """(n, 2) pairs of global ids whose pixels touch across block faces (full connectivity).

        Only the two planes on either side of each block face are read: within a block, touching pixels
        always share their label (its components are full-connectivity ones).
        """
        edges = []
        offs = _half_offsets(len(shape))
        for region in self._face_regions(shape):
            ids = self.read(region)
            for d in offs:
                src = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(d, ids.shape))
                dst = tuple(slice(s.start + o, s.stop + o) for s, o in zip(src, d))
                a, b = ids[src], ids[dst]
                sel = (a > 0) & (b > 0) & (a != b)
                if sel.any():
                    edges.append(np.stack([a[sel], b[sel]], axis=1))
        return np.unique(np.concatenate(edges), axis=0) if edges else np.zeros((0, 2), dtype=np.int64)


def _first_pixels(lab: np.ndarray, n: int, origin: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Row-major index in the field (``shape``) of the first pixel of labels 1..n of a block at ``origin``
    (labels numbered by first pixel, so the block's order is the field's order among them)."""
    flat = lab.ravel()
    nz = np.flatnonzero(flat)
    _, first = np.unique(flat[nz], return_index=True)
    local = np.unravel_index(nz[first], lab.shape)
    return np.ravel_multi_index(tuple(c + o for c, o in zip(local, origin)), tuple(shape)).astype(np.int64)


def _components(n: int, edges: np.ndarray, key: np.ndarray | None = None) -> np.ndarray:
    """Map ids 1..n to consecutive component ids 1..k, 0 stays 0: numbered in the order of their smallest
    ``key`` (keys of ids 1..n; the id itself when None), i.e. of their first pixel when ``key`` is it."""
    mapping = np.zeros(n + 1, dtype=np.int64)
    if n == 0:
        return mapping
    if len(edges):
        e = edges - 1
        g = coo_matrix((np.ones(len(e), dtype=np.int8), (e[:, 0], e[:, 1])), shape=(n, n))
        _, comp = connected_components(g, directed=False)
    else:
        comp = np.arange(n)
    # renumber components by their smallest member so the order follows the scan order of the seeds
    first = np.full(comp.max() + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, comp, np.arange(n) if key is None else key)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    mapping[1:] = rank[comp] + 1
    return mapping


class _Writes:
    """Writes of block regions into an array-like from worker threads: a lock unless the target is numpy or
    each block covers whole chunks (shards) of it, where concurrent writes never touch the same chunk."""

    def __init__(self, arr: Any, block: Sequence[int]):
        target = getattr(arr, "array", arr)  # LeadingView / Plane2DView
        grid = getattr(target, "shards", None) or getattr(target, "chunks", None)
        aligned = isinstance(target, np.ndarray) or (
            grid is not None and all(b % c == 0 for b, c in zip(block, tuple(grid)[-len(block):])))
        self.arr, self.lock = arr, (contextlib.nullcontext() if aligned else threading.Lock())

    def __setitem__(self, region: tuple[slice, ...], value: np.ndarray) -> None:
        with self.lock:
            self.arr[region] = value


def _sums(ids: np.ndarray, origin: Sequence[int]) -> tuple[int, np.ndarray, np.ndarray]:
    """(lowest id, pixel counts, coordinate sums per axis) of the non-zero ids of a block whose first pixel
    is at ``origin``; the counts cover ids lo..max only, so memory follows the block, not the field."""
    flat = ids.ravel()
    nz = np.flatnonzero(flat)
    if not len(nz):
        return 0, np.zeros(0, np.int64), np.zeros((ids.ndim, 0))
    v = flat[nz].astype(np.int64)
    lo = int(v.min())
    v -= lo
    counts = np.bincount(v)
    coords = []
    for n in ids.shape[:0:-1]:  # C order: peel the last axis off the flat index
        nz, c = np.divmod(nz, n)
        coords.append(c)
    coords.append(nz)
    # integer sums are exact in float64, so adding the origin afterwards changes nothing
    csum = np.stack([np.bincount(v, weights=c) + o * counts for c, o in zip(coords[::-1], origin)])
    return lo, counts, csum


def _add_sums(area: np.ndarray, csum: np.ndarray, part: tuple[int, np.ndarray, np.ndarray]) -> None:
    lo, counts, s = part
    area[lo:lo + len(counts)] += counts
    csum[:, lo:lo + len(counts)] += s


class _Stopwatch:
    """Wall seconds per stage, summed over calls (``timings`` of the result; ``bench/ais.py --profile``)."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.split: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.split[name] = self.split.get(name, 0.0) + now - self.t
        self.t = now


@dataclass
class _Watershed:
    """What the watershed pass leaves for the rescue and relabel passes."""

    blocks: Sequence[Block]  # blocks (tiled) or row bands (untiled) of the later passes
    block: tuple[int, ...]
    scratch: Any
    scratch_w: Any
    n_ws: int
    sizes: np.ndarray
    csum: np.ndarray
    inner_fg: Callable[[Block], np.ndarray]  # foreground mask over a block's inner region


def ais_blockwise(maps: Any, out: Any, p: AISParams, block: int | Sequence[int],
                  halo: int | Sequence[int], scratch: Any = None,
                  progress: Callable[[str, int], None] | None = None, threads: int = 1,
                  cache_bytes: int = CACHE_BYTES) -> dict[str, Any]:
    """AIS over ``maps`` (array-like (3, *spatial), read lazily) into ``out`` (array-like, uint32).

    ``scratch`` is an integer array-like of the spatial shape for temporary block labels (numpy when None).
    Blocks run on ``threads`` worker threads (the smoothing and labelling release the GIL); the labels do
    not depend on the thread count. Each block's smoothed maps are computed once: the first pass keeps
    its foreground mask and heightmap for the watershed pass while they fit in ``cache_bytes`` (the rest is
    recomputed), so memory is bounded by that budget plus one block with its halo per thread.

    In memory (``scratch`` None, or one block) the smoothing, thresholds and seed labelling run on row bands
    (the first axis) on the pool: a Gaussian over a band plus ``smoothing_reach`` rows gives the full-image
    values bit for bit (unlike a crop along the last axis, whose SIMD alignment changes the rounding), and
    band labels merged across the band faces and numbered by first pixel are the full-image labels; then
    the watershed floods each foreground component with several seeds whole, grouped by the bands it spans,
    on the pool (memory: 13 bytes per pixel of the field), so that the labels are micro-sam's untiled ones
    for any block, halo and thread count (see ``_in_memory``). Returns the object statistics (``label``,
    ``area``, ``centroid`` per axis), the number of objects and ``timings`` (wall seconds per stage).
    """
    shape = tuple(out.shape)
    ndim = len(shape)
    block = tuple(block) if not isinstance(block, int) else (block,) * ndim
    block = tuple(min(b, s) for b, s in zip(block, shape))
    halo_t = tuple(halo) if not isinstance(halo, int) else (halo,) * ndim
    reach = smoothing_reach(p)
    halo_t = tuple(max(h, reach) if b < s else 0 for h, b, s in zip(halo_t, block, shape))
    blocks = block_grid(shape, block, halo_t)
    step = progress or (lambda name, i: None)
    threads = max(1, int(threads))
    clock = _Stopwatch()
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(threads)) if threads > 1 else None
        run = pool.map if pool is not None else map
        if len(blocks) == 1 or scratch is None:  # in memory: banded seeds, blockwise watershed
            ws = _in_memory(maps, out, p, shape, reach, threads, run, step, clock)
        else:
            ws = _tiled(maps, out, p, blocks, block, shape, scratch, run, step, cache_bytes, clock)
        res = _finish(out, p, ws, shape, run, step, clock)
    res["timings"] = clock.split
    return res


def _maps_at(maps: Any, region: tuple[slice, ...], channel: Any = slice(None)) -> np.ndarray:
    return np.asarray(maps[(channel,) + region], dtype=np.float32)


def _bands(shape: Sequence[int], threads: int, reach: int) -> list[Block]:
    """Row bands (whole planes of the first axis) for the in-memory path: two per thread, none thinner than
    a few smoothing reaches (each band smooths ``reach`` extra rows on either side)."""
    n = max(1, min(2 * threads if threads > 1 else 1, shape[0] // (8 * reach)))
    return block_grid(shape, (-(-shape[0] // n),) + tuple(shape[1:]), 0)


def _face_edges(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """(n, 2) id pairs of touching pixels (full connectivity) between two adjacent planes of global ids."""
    edges = []
    for d in product((-1, 0, 1), repeat=top.ndim):
        src = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(d, top.shape))
        dst = tuple(slice(s.start + o, s.stop + o) for s, o in zip(src, d))
        a, b = top[src], bottom[dst]
        sel = (a > 0) & (b > 0)
        if sel.any():
            edges.append(np.stack([a[sel], b[sel]], axis=1))
    return np.concatenate(edges) if edges else np.zeros((0, 2), np.int64)


_MULTI = np.uint32(2**32 - 1)  # class code of a foreground component with several seeds (the watershed's work)


def _in_memory(maps, out, p, shape, reach, threads, run, step, clock) -> _Watershed:
    """The in-memory path: banded smoothing, thresholds and seed labels over the whole field (the untiled
    values and seed ids), then the watershed of each foreground component on the pool (see ais_blockwise).

    The watershed floods within the foreground components (axis-aligned connectivity, its own), each on its
    own: a component with one seed id is that id, one without seeds stays 0, whatever the heights. Only
    components with several seeds (a third of the foreground on the DSB mosaic) go through the watershed;
    the others are one lookup per pixel ("class code": the seed id, 0, or a flood job's code). The
    multi-seed components are flooded whole, grouped by the bands they span (``_band_span``, ``_job_rows``), so the
    labels are exactly those of one watershed over the field (micro-sam's untiled call) at any thread
    count, and no pixel is flooded twice (a block with a halo floods its halo again, and agrees with the
    whole field only where the halo covers the watershed's reach)."""
    bands = _bands(shape, threads, reach)
    rest = tuple(slice(0, s) for s in shape[1:])
    fg_mask = np.empty(shape, bool)
    hmap = np.empty(shape, np.float32)
    labels = np.empty(shape, np.uint32)  # band-local seed labels, then the watershed markers
    comp = np.empty(shape, np.uint32)  # band-local foreground components, then their class code

    def seeds_of(blk: Block) -> tuple[int, int]:
        a, b = blk.inner[0].start, blk.inner[0].stop
        lo, hi = max(a - reach, 0), min(b + reach, shape[0])
        raw = _maps_at(maps, (slice(lo, hi),) + rest)
        inner = slice(a - lo, b - lo)
        np.greater(_smooth(raw[0], p.foreground_smoothing)[inner], p.foreground_threshold, out=fg_mask[a:b])
        np.copyto(hmap[a:b], _smooth(raw[2], p.distance_smoothing)[inner])
        seed = np.less(_smooth(raw[1], p.distance_smoothing)[inner], p.center_distance_threshold)
        seed &= fg_mask[a:b]
        seed &= hmap[a:b] < p.boundary_distance_threshold
        n_fg = ndi.label(fg_mask[a:b], output=comp[a:b].view(np.int32))  # scipy's default: axis-aligned
        return _label(seed, labels[a:b])[1], int(n_fg), _range(hmap[a:b], fg_mask[a:b])

    parts = list(run(seeds_of, bands))
    step("seeds", 0)
    clock.lap("smooth+seeds")
    heights = _merge_ranges([r for *_, r in parts])
    parts = [(n, n_fg) for n, n_fg, _ in parts]
    counts = [n for n, _ in parts]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    fg_offsets = np.concatenate([[0], np.cumsum([n for _, n in parts])]).astype(np.int64)
    seed_edges, fg_edges = [], []
    for k, blk in enumerate(bands[1:], start=1):  # band k's first plane touches band k-1's last one
        a = blk.inner[0].start
        seed_edges.append(_face_edges(_offset(labels[a - 1], offsets[k - 1]), _offset(labels[a], offsets[k])))
        top, bottom = _offset(comp[a - 1], fg_offsets[k - 1]), _offset(comp[a], fg_offsets[k])
        sel = (top > 0) & (bottom > 0)
        fg_edges.append(np.stack([top[sel], bottom[sel]], axis=1))
    seed_map = _components(int(offsets[-1]), _unique_edges(seed_edges))  # by first member: row-major order
    fg_map = _components(int(fg_offsets[-1]), _unique_edges(fg_edges))
    n_ws = int(seed_map.max())

    def markers_of(k_blk: tuple[int, Block]) -> np.ndarray:
        """Global seed ids over the band's seed pixels; the (component, seed) pairs there."""
        k, blk = k_blk
        a, b = blk.inner[0].start, blk.inner[0].stop
        band = labels[a:b].reshape(-1)  # a view: bands are whole planes
        nz = np.flatnonzero(band)  # seeds are a few percent of the pixels: look up only those
        if k:
            lut = seed_map[offsets[k]:offsets[k] + counts[k] + 1].astype(np.uint32)
            band[nz] = lut[band[nz]]
        cc = fg_map[comp[a:b].reshape(-1)[nz] + fg_offsets[k]]  # seeds lie in the foreground: cc > 0
        return np.unique(cc * (n_ws + 1) + band[nz])

    pairs = np.unique(np.concatenate(list(run(markers_of, enumerate(bands)))))
    pair_comp, pair_seed = np.divmod(pairs, n_ws + 1)
    n_per_comp = np.bincount(pair_comp, minlength=int(fg_map.max()) + 1)
    code = np.zeros(len(n_per_comp), np.uint32)
    one = n_per_comp[pair_comp] == 1
    code[pair_comp[one]] = pair_seed[one]
    first_band, last_band = _band_span(fg_map, fg_offsets, len(bands))
    multi = np.flatnonzero(n_per_comp > 1)
    spans, job_of = np.unique(first_band[multi] * len(bands) + last_band[multi], return_inverse=True)
    if n_ws >= _MULTI - len(spans):
        raise ValueError(f"{n_ws} seeds: too many for uint32 markers")
    code[multi] = _MULTI - job_of.astype(np.uint32)
    code_of = code[fg_map]  # band-local component -> class code, through the band offsets

    def classes_of(k_blk: tuple[int, Block]) -> None:
        k, blk = k_blk
        a, b = blk.inner[0].start, blk.inner[0].stop
        band = comp[a:b].reshape(-1)
        nz = np.flatnonzero(band)
        band[nz] = code_of[band[nz] + fg_offsets[k]]

    list(run(classes_of, enumerate(bands)))
    rows = [_job_rows(comp, _MULTI - np.uint32(j), bands[k // len(bands)], bands[k % len(bands)])
            for j, k in enumerate(spans.tolist())]
    clock.lap("merge seeds")

    def flood(j: int) -> None:
        """Job j's watershed: its components, whole, over the rows they span; the seed ids it gives are
        written over their class code (no other job's pixel has this job's code)."""
        a, b = rows[j]
        classes = comp[a:b]
        mask = classes == _MULTI - np.uint32(j)
        classes[mask] = _watershed(hmap[a:b], labels[a:b], mask, heights)[mask]

    list(run(flood, sorted(range(len(rows)), key=lambda j: rows[j][0] - rows[j][1])))  # largest first
    clock.lap("watershed")
    out_w = _Writes(out, bands[0].inner_shape)

    def write_of(blk: Block) -> tuple[int, np.ndarray, np.ndarray]:
        ids = comp[blk.inner]
        out_w[blk.inner] = ids
        return _sums(ids, [s.start for s in blk.inner])

    sizes = np.zeros(n_ws + 1, dtype=np.int64)
    csum = np.zeros((len(shape), n_ws + 1))
    for i, part in enumerate(run(write_of, bands)):
        _add_sums(sizes, csum, part)
        step("watershed", i)
    clock.lap("write+sums")
    # the markers array is free now: it holds the band labels of the rescue pass
    return _Watershed(bands, bands[0].inner_shape, labels, labels, n_ws, sizes, csum,
                      lambda blk: fg_mask[blk.inner])


def _range(values: np.ndarray, where: np.ndarray) -> tuple[float, float]:
    """(min, max) of ``values`` where ``where`` (inf, -inf when nowhere); the selection is faster than
    masked reductions."""
    v = values[where]
    return (float(v.min()), float(v.max())) if len(v) else (np.inf, -np.inf)


def _merge_ranges(ranges: Sequence[tuple[float, float]]) -> tuple[float, float]:
    return min(r[0] for r in ranges), max(r[1] for r in ranges)


def _watershed(hmap: np.ndarray, markers: np.ndarray, mask: np.ndarray, heights: tuple[float, float]) -> np.ndarray:
    """``bioimage_cpp.segmentation.watershed`` with the heights quantized over ``heights`` (the foreground
    range of the whole field) instead of over the call's own mask.

    The watershed quantizes the heights to 65,536 levels between the minimum and maximum over its mask, so a
    call on part of the field (a block, a component) orders near-equal heights differently from one call on
    the whole field (micro-sam's untiled call, whose mask is the field's foreground). Two pixels holding
    that range, isolated behind unmasked slabs (no seed reaches them), give every call the whole field's
    levels; each component then floods exactly as in the whole-field call (within a level, in the scan
    order of its own pixels)."""
    lo, hi = heights
    if not mask.any() or not np.isfinite(lo):
        return np.zeros(mask.shape, markers.dtype)
    n = mask.shape[0]
    h, m, k = (_padded(a, n) for a in (hmap.astype(np.float32, copy=False), mask, markers))
    h[n + 1].flat[0], h[n + 3].flat[0] = lo, hi
    m[n + 1].flat[0] = m[n + 3].flat[0] = True
    return bic.segmentation.watershed(h, markers=k, mask=m)[:n]


def _padded(a: np.ndarray, n: int) -> np.ndarray:
    """``a`` followed by four zero slabs along the first axis (one copy)."""
    out = np.empty((n + 4,) + a.shape[1:], a.dtype)
    out[:n] = a
    out[n:] = 0
    return out


def _band_span(fg_map: np.ndarray, fg_offsets: np.ndarray, n_bands: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last band of every foreground component (by global component id)."""
    n = int(fg_map.max()) + 1
    first, last = np.full(n, n_bands, np.int64), np.full(n, -1, np.int64)
    for k in range(n_bands):  # over bands (a few per thread), vectorized over their components
        ids = fg_map[fg_offsets[k] + 1:fg_offsets[k + 1] + 1]
        np.minimum.at(first, ids, k)
        np.maximum.at(last, ids, k)
    return first, last


def _job_rows(classes: np.ndarray, code: np.uint32, top: Block, bottom: Block, step: int = 16) -> tuple[int, int]:
    """The rows (first-axis range) of the components with class ``code``, which all start in band ``top``
    and end in band ``bottom``: that band's rows when they are one band; else from the first row they
    reach above the lower face of ``top`` to the last below the upper face of ``bottom`` (a component's
    rows are one interval, so the scan from each face stops at the first row without them)."""
    a, b = top.inner[0].start, bottom.inner[0].stop
    if top.index == bottom.index:
        return a, b
    up = top.inner[0].stop
    while up > a and _rows_hold(classes[max(up - step, a):up], code).all():
        up = max(up - step, a)
    if up > a:
        up -= int(np.argmin(_rows_hold(classes[max(up - step, a):up], code)[::-1]))
    down = bottom.inner[0].start
    while down < b and _rows_hold(classes[down:min(down + step, b)], code).all():
        down = min(down + step, b)
    if down < b:
        down += int(np.argmin(_rows_hold(classes[down:min(down + step, b)], code)))
    return up, down


def _rows_hold(classes: np.ndarray, code: np.uint32) -> np.ndarray:
    """Per row (first axis) of ``classes``: whether any pixel has ``code``."""
    return (classes == code).reshape(len(classes), -1).any(axis=1)


def _offset(plane: np.ndarray, offset: int) -> np.ndarray:
    """A plane of band-local ids as global ids (``offset`` added to the non-zero ones), int64."""
    ids = plane.astype(np.int64)
    np.add(ids, offset, out=ids, where=ids > 0)
    return ids


def _unique_edges(edges: list[np.ndarray]) -> np.ndarray:
    return np.unique(np.concatenate(edges), axis=0) if edges else np.zeros((0, 2), np.int64)


def _tiled(maps, out, p, blocks, block, shape, scratch, run, step, cache_bytes, clock) -> _Watershed:
    """Seed labels per block, global seed ids, then the seeded watershed per block with its halo."""
    ndim = len(shape)
    out_w, scratch_w = _Writes(out, block), _Writes(scratch, block)
    cache: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
    budget = [int(cache_bytes)]
    reach = smoothing_reach(p)
    lock = threading.Lock()

    def masks_for_watershed(blk):
        """(foreground mask, heightmap) over the block with its halo: from the cache, or recomputed."""
        with lock:
            hit = cache.pop(blk.index, None)
        if hit is not None:
            return hit
        fg = _smooth(_maps_at(maps, blk.outer, 0), p.foreground_smoothing)  # the center distance is not needed
        return fg > p.foreground_threshold, _smooth(_maps_at(maps, blk.outer, 2), p.distance_smoothing)

    # pass 1: local seed labels per block (maps smoothed once, kept for pass 2 within the budget)
    def seeds_of(blk):
        raw = _maps_at(maps, blk.outer)
        fg = _smooth(raw[0], p.foreground_smoothing)
        boundary = _smooth(raw[2], p.distance_smoothing)
        il = blk.inner_local
        # seeds only over the inner part: the center map is smoothed over its rows plus the reach (exact:
        # a crop along the first axis leaves the Gaussian's values unchanged), with the outer width
        r0, r1 = max(il[0].start - reach, 0), min(il[0].stop + reach, raw.shape[1])
        center = _smooth(raw[1, r0:r1], p.distance_smoothing)
        fg_mask = fg > p.foreground_threshold
        seed = (center[(slice(il[0].start - r0, il[0].stop - r0),) + il[1:]] < p.center_distance_threshold) \
            & (boundary[il] < p.boundary_distance_threshold) & fg_mask[il]
        lab, n = _label(seed)
        scratch_w[blk.inner] = lab.astype(scratch.dtype, copy=False)
        nbytes = fg_mask.nbytes + boundary.nbytes
        with lock:
            if budget[0] >= nbytes:
                budget[0] -= nbytes
                cache[blk.index] = (fg_mask, boundary)
        return n, _first_pixels(lab, n, [s.start for s in blk.inner], shape), _range(boundary[il], fg_mask[il])

    seeds = _GlobalIds(scratch, blocks, block)
    counts, firsts, ranges = {}, [], []
    for i, (blk, (n, first, heights)) in enumerate(zip(blocks, run(seeds_of, blocks))):
        counts[blk.index] = n
        firsts.append(first)
        ranges.append(heights)
        step("seeds", i)
    heights = _merge_ranges(ranges)
    clock.lap("smooth+seeds")
    n_seeds = seeds.set_counts(counts)
    # seeds numbered by their first pixel in the field, as the in-memory path numbers them
    seed_map = _components(n_seeds, seeds.merge_edges(shape), np.concatenate(firsts))
    n_ws = int(seed_map.max())
    # the watershed runs faster on 32-bit markers; labels are the same for any marker dtype
    marker_dtype = np.uint32 if n_ws < 2**32 else np.uint64
    # global ids written over the local ones once per block (one lookup per pixel), so that a block's markers
    # are one read of its outer region, not a lookup per block it overlaps; else looked up on each read
    in_place = n_ws <= np.iinfo(scratch.dtype).max

    def to_global(blk):
        o = int(seeds.offsets[blk.index])
        local = np.asarray(scratch[blk.inner])
        lut = seed_map[o:o + counts[blk.index] + 1].astype(scratch.dtype)
        lut[0] = 0
        scratch_w[blk.inner] = np.take(lut, local)

    if in_place:
        list(run(to_global, blocks))
    clock.lap("merge seeds")
    inner_fg: dict[tuple[int, ...], np.ndarray] = {}

    # pass 2: seeded watershed per block with halo, global seed ids; object sums of the inner part
    def watershed_of(blk):
        fg_mask, hmap = masks_for_watershed(blk)
        markers = (np.asarray(scratch[blk.outer]).astype(marker_dtype, copy=False) if in_place
                   else seeds.read_mapped(blk.outer, seed_map, marker_dtype))
        ws = _watershed(hmap, markers, fg_mask, heights)[blk.inner_local]
        out_w[blk.inner] = ws.astype(np.uint32, copy=False)
        if p.keep_unseeded:  # the rescue pass needs the inner foreground mask
            with lock:
                inner_fg[blk.index] = np.ascontiguousarray(fg_mask[blk.inner_local])
        return _sums(ws, [s.start for s in blk.inner])

    sizes = np.zeros(n_ws + 1, dtype=np.int64)
    csum = np.zeros((ndim, n_ws + 1))
    for i, part in enumerate(run(watershed_of, blocks)):
        _add_sums(sizes, csum, part)
        step("watershed", i)
    cache.clear()
    clock.lap("watershed+sums")

    def fg_inner(blk):
        with lock:
            hit = inner_fg.pop(blk.index, None)
        return hit if hit is not None else masks_for_watershed(blk)[0][blk.inner_local]

    return _Watershed(blocks, block, scratch, scratch_w, n_ws, sizes, csum, fg_inner)


def _finish(out, p, w: _Watershed, shape, run, step, clock) -> dict[str, Any]:
    """Optional rescue of unseeded foreground, size filter, consecutive ids, statistics."""
    ndim = len(shape)
    blocks, n_ws, sizes, csum = w.blocks, w.n_ws, w.sizes, w.csum
    out_w = _Writes(out, w.block)
    # optional pass: foreground components without any seed become objects
    n_rescued = 0
    rest = rest_map = None
    if p.keep_unseeded:
        rest = _GlobalIds(w.scratch, blocks, w.block)

        def unseeded_of(blk):
            lab, n = _label(w.inner_fg(blk) & (np.asarray(out[blk.inner]) == 0))
            w.scratch_w[blk.inner] = lab.astype(w.scratch.dtype, copy=False)
            return n, _first_pixels(lab, n, [s.start for s in blk.inner], shape)

        parts = list(run(unseeded_of, blocks))
        n_rest = rest.set_counts({blk.index: n for blk, (n, _) in zip(blocks, parts)})
        rest_map = _components(n_rest, rest.merge_edges(shape), np.concatenate([f for _, f in parts]))
        n_rescued = int(rest_map.max())
        rest_sizes = np.zeros(n_rescued + 1, dtype=np.int64)
        rest_csum = np.zeros((ndim, n_rescued + 1))
        for part in run(lambda blk: _sums(rest_map[rest.read(blk.inner)], [s.start for s in blk.inner]),
                        blocks):
            _add_sums(rest_sizes, rest_csum, part)
        sizes = np.concatenate([sizes, rest_sizes[1:]])
        csum = np.concatenate([csum, rest_csum[:, 1:]], axis=1)
        clock.lap("rescue")

    # global lookup: size filter + consecutive ids (micro-sam drops objects with size < min_size)
    keep = sizes >= max(p.min_size, 1)
    keep[0] = False
    final = np.zeros(len(sizes), dtype=np.int64)
    final[keep] = np.arange(1, int(keep.sum()) + 1)
    n_final = int(keep.sum())

    # pass 3: apply the lookup (not needed when it is the identity)
    if not (n_rescued == 0 and n_final == n_ws):
        final32 = final.astype(np.uint32)

        def relabel(blk):
            ids = np.asarray(out[blk.inner])
            if n_rescued:
                ids = ids.astype(np.int64)
                r = rest_map[rest.read(blk.inner)]
                ids = np.where(ids > 0, ids, np.where(r > 0, r + n_ws, 0))
            out_w[blk.inner] = np.take(final32, ids)

        for i, _ in enumerate(run(relabel, blocks)):
            step("relabel", i)
        clock.lap("relabel")
    area = sizes[keep]
    with np.errstate(invalid="ignore", divide="ignore"):
        centroid = csum[:, keep] / area
    return {"n_objects": n_final, "label": np.arange(1, n_final + 1), "area": area,
            "centroid": centroid, "n_seeds": n_ws, "n_rescued": int((final[n_ws + 1:] > 0).sum())}
