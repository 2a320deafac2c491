"""Mask candidates -> instance labels: sparse mask-IoU NMS and exclusive painting (APG and AMG).

Masks are CSR pixel lists in field coordinates. Overlaps come from one sparse product ``M @ M.T``, which only
touches pairs that share pixels (never a dense N x N matrix), and the greedy NMS is resolved in vectorised
rounds over those pairs instead of a Python loop over masks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from scipy import sparse
from skimage.measure import label as cc_label

GEMM_BYTES = 256 * 2**20  # largest masks x field pixels 0/1 matrix (uint8) of the dense overlap product


def csr_take(ptr: np.ndarray, pixels: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ptr, pixels) of the selected rows of a CSR pixel list, in the order of ``rows``."""
    rows = np.asarray(rows, np.int64)
    if len(rows) == len(ptr) - 1 and np.array_equal(rows, np.arange(len(rows))):
        return ptr, pixels  # every row in order: nothing to copy
    lengths = (ptr[1:] - ptr[:-1])[rows]
    out = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    if len(rows) < 2 or np.all(rows[1:] > rows[:-1]):  # increasing rows: one boolean selection of pixels
        keep = np.zeros(len(ptr) - 1, bool)
        keep[rows] = True
        return out, pixels[np.repeat(keep, ptr[1:] - ptr[:-1])]
    owner = np.repeat(np.arange(len(rows)), lengths)
    return out, pixels[ptr[rows][owner] + (np.arange(out[-1]) - out[:-1][owner])]


@dataclass
class Candidates:
    """Candidate masks of one field: mask ``i`` is ``pixels[ptr[i]:ptr[i+1]]`` (flat ``y * width + x``)."""

    shape: tuple[int, int]
    ptr: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    pixels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    area: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    iou: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    stability: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    bbox: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))
    point: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float64))

    def __len__(self) -> int:
        return len(self.area)

    @classmethod
    def concat(cls, shape: tuple[int, int], parts: list[tuple]) -> "Candidates":
        """One field's candidates from batches ``(ptr, pixels, area, iou, stability, bbox, point)``, copied once."""
        if not parts:
            return cls(tuple(shape))
        ptrs, pixels, area, iou, stability, bbox, point = zip(*parts)
        offsets = np.cumsum([0] + [p[-1] for p in ptrs[:-1]])
        ptr = np.concatenate([[0]] + [p[1:] + o for p, o in zip(ptrs, offsets)]).astype(np.int64)
        return cls(tuple(shape), ptr, np.concatenate(pixels), np.concatenate(area), np.concatenate(iou),
                   np.concatenate(stability), np.concatenate(bbox), np.concatenate(point))

    def subset(self, keep: np.ndarray) -> "Candidates":
        return subset_rows(self, keep, csr_take)

    def owners(self) -> np.ndarray:
        return np.repeat(np.arange(len(self)), self.ptr[1:] - self.ptr[:-1])


def subset_rows(c: Any, keep: np.ndarray, take: Callable) -> Any:
    """The candidates ``keep`` (bool mask or indices) of ``c`` as a new object of its type (``c`` itself when
    every row is kept); ``take(ptr, pixels, rows)`` selects CSR rows (numpy here, torch for the device
    candidates of ``embed.device_masks``)."""
    keep = np.asarray(keep)
    if keep.dtype == bool:
        if keep.all():
            return c
        keep = np.flatnonzero(keep)
    ptr, pixels = take(c.ptr, c.pixels, keep)
    return type(c)(c.shape, ptr, pixels, c.area[keep], c.iou[keep], c.stability[keep], c.bbox[keep], c.point[keep])


def overlaps(c: Candidates, method: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, intersection) for every pair i < j of masks sharing at least one pixel.

    Only pixels covered by two masks or more can add to an intersection. The sparse product ``M @ M.T``
    costs the sum over those pixels of their coverage squared, which explodes when many large masks overlap;
    then the masks become 0/1 rows over those pixels and all intersections are one dense matrix product
    (``gemm``: float32 BLAS in column chunks, exact since every chunk's counts stay below 2^24), or, when that
    matrix would not fit ``GEMM_BYTES``, bit rows intersected as AND + popcount (``bits``). The cheapest is
    used (``method`` "auto"; or "sparse", "gemm", "bits"); all give the exact counts.
    """
    n = len(c)
    none = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    if n < 2:
        return none
    size = int(np.prod(c.shape))
    cover = np.bincount(c.pixels, minlength=size)
    multi = cover >= 2
    n_multi = int(multi.sum())
    if n_multi == 0:
        return none
    sparse_cost = float(np.sum(cover[multi].astype(np.float64) ** 2))
    dense_cost = float(n) * n * (n_multi / 64 + 1)
    fits = n * size <= GEMM_BYTES
    # a popcount word costs several times a sparse multiply-add, a BLAS multiply-add ~1/16 of one
    # (measured on the bench fields: the product is ~4x faster than the packed bits)
    if method == "gemm" or (method == "auto" and fits and dense_cost < sparse_cost):
        return _overlaps_gemm(c, multi, n_multi)
    if method == "bits" or (method == "auto" and 4 * dense_cost < sparse_cost):
        return _overlaps_bits(c, multi, n_multi)
    m = sparse.csr_matrix((np.ones(len(c.pixels), np.int32), c.pixels, c.ptr), shape=(n, size))
    inter = sparse.triu(m @ m.T, k=1).tocoo()
    return inter.row.astype(np.int64), inter.col.astype(np.int64), inter.data.astype(np.int64)


def _multi_columns(c: Candidates, multi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, column) of every mask pixel covered twice or more; columns count those pixels in flat order."""
    sel = multi[c.pixels]
    return c.owners()[sel], (np.cumsum(multi) - 1)[c.pixels[sel]]


def _overlaps_gemm(c: Candidates, multi: np.ndarray, n_multi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``overlaps`` as ``D @ D.T`` for the 0/1 matrix D (masks x pixels), in float32 column chunks of at most
    2^16 pixels (every partial count is an exact float32 integer), summed in float64. Chunks are contiguous
    column slices (no gather): pixels covered once only add to the diagonal, which is not read; chunks
    without a multiply covered pixel are skipped."""
    n = len(c)
    size = len(multi)
    d = np.zeros((n, size), np.uint8)  # masks x all pixels, one scatter
    d.reshape(-1)[np.repeat(np.arange(n, dtype=np.int64) * size, c.ptr[1:] - c.ptr[:-1]) + c.pixels] = 1
    acc = np.zeros((n, n), np.float64)
    width = int(min(1 << 16, max(1024, (1 << 20) // n)))  # a float32 chunk of ~4 MB stays in cache
    for c0 in range(0, size, width):
        if multi[c0:c0 + width].any():
            x = d[:, c0:c0 + width].astype(np.float32)
            acc += x @ x.T
    inter = acc.astype(np.int64)
    i, j = np.nonzero(np.triu(inter, k=1))
    return i.astype(np.int64), j.astype(np.int64), inter[i, j]


def _overlaps_bits(c: Candidates, multi: np.ndarray, n_multi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``overlaps`` with each mask as a bit row over the ``multi`` pixels (AND + popcount per pair)."""
    n = len(c)
    owner, col = _multi_columns(c, multi)  # columns increase within each mask
    words = -(-n_multi // 64)
    key = owner * words + col // 64  # sorted: masks in order, pixels sorted within a mask
    bit = np.left_shift(np.uint64(1), (col % 64).astype(np.uint64))
    packed = np.zeros(n * words, np.uint64)
    if len(key):
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        packed[key[starts]] = np.add.reduceat(bit, starts)  # distinct bits: the sum is the OR
    packed = packed.reshape(n, words)
    rows = max(1, (1 << 22) // max(1, n * words))  # bounded temporary: rows x n x words
    ii, jj, vv = [], [], []
    for r0 in range(0, n, rows):
        blk = np.bitwise_count(packed[r0:r0 + rows, None, :] & packed[None, :, :]).sum(-1, dtype=np.int64)
        i, j = np.nonzero(np.triu(blk, k=r0 + 1))
        ii.append(i + r0)
        jj.append(j)
        vv.append(blk[i, j])
    return np.concatenate(ii), np.concatenate(jj), np.concatenate(vv)


def greedy_nms(scores: np.ndarray, i: np.ndarray, j: np.ndarray, suppress: np.ndarray) -> np.ndarray:
    """Indices kept by greedy NMS (highest score first; ties by index) given the pairs that suppress.

    Same result as the sequential loop: a mask is kept iff no kept mask ranked above it suppresses it.
    Solved in rounds; each round decides at least the highest-ranked undecided mask.
    """
    n = len(scores)
    order = np.lexsort((np.arange(n), -np.asarray(scores, np.float64)))
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    i, j = i[suppress], j[suppress]
    src = np.where(rank[i] < rank[j], i, j)
    dst = np.where(rank[i] < rank[j], j, i)
    state = np.zeros(n, np.int8)  # 0 undecided, 1 kept, 2 suppressed
    while True:
        und = state == 0
        if not und.any():
            break
        hit = np.zeros(n, bool)
        hit[dst[state[src] == 1]] = True
        wait = np.zeros(n, bool)
        wait[dst[state[src] == 0]] = True
        state[und & hit] = 2
        state[und & ~hit & ~wait] = 1
    kept = np.flatnonzero(state == 1)
    return kept[np.argsort(rank[kept], kind="stable")]


def mask_nms(c: Candidates, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy NMS on mask IoU (pairs with IoU > ``threshold`` suppress), in score order."""
    i, j, inter = overlaps(c)
    union = c.area[i] + c.area[j] - inter
    iou = inter / np.maximum(union, 1)
    return greedy_nms(scores, i, j, iou > threshold)


def paint(c: Candidates, order: np.ndarray, min_size: int = 0, drop_largest: bool = False) -> np.ndarray:
    """Instance labels from masks painted in ``order`` (largest first), each only on unclaimed pixels.

    As micro-sam's ``mask_data_to_segmentation``: paint exclusively, split each painted object into its
    4-connected fragments, drop fragments smaller than ``min_size`` (and the largest one with
    ``drop_largest``, AMG's background), relabel consecutively in raster order. Returns uint32 labels.
    """
    h, w = c.shape
    seg = np.zeros(h * w, np.uint32)
    if len(order):
        # first claim wins: each pixel takes the smallest paint rank of the masks covering it
        none = np.iinfo(np.int64).max  # masks not in ``order`` carry it: the fill value, they never claim
        rank_of = np.full(len(c), none, np.int64)
        rank_of[order] = np.arange(len(order))
        best = np.full(h * w, none, np.int64)
        np.minimum.at(best, c.pixels, np.repeat(rank_of, c.ptr[1:] - c.ptr[:-1]))
        hit = best != none
        seg[hit] = best[hit] + 1
    return fragments(seg.reshape(h, w), min_size, drop_largest)


def fragments(seg: np.ndarray, min_size: int = 0, drop_largest: bool = False) -> np.ndarray:
    """The last step of :func:`paint` on its painted image (paint rank + 1, 0 unclaimed): 4-connected
    fragments, the small ones (and with ``drop_largest`` the largest) dropped, relabelled in raster order."""
    frag = cc_label(seg, connectivity=1, background=0).astype(np.uint32)
    sizes = np.bincount(frag.ravel())
    drop = sizes < min_size
    if drop_largest:  # micro-sam: the largest id, background included (then nothing is dropped)
        drop[int(np.argmax(sizes))] = True
    drop[0] = True
    lut = np.zeros(len(sizes), np.uint32)
    lut[~drop] = np.arange(1, int((~drop).sum()) + 1, dtype=np.uint32)
    return lut[frag]
