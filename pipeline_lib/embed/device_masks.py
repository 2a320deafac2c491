"""Candidate masks that stay on the decoder's device: mask-IoU NMS and painting in torch (APG and AMG).

The same algorithm as ``instances.nms`` (which stays torch-free), on CSR pixel lists held as device tensors,
so that on a GPU the candidates never leave it: the pairwise intersections are one dense 0/1 matrix product
per column chunk (float32, exact: every chunk's counts stay below 2^24), the greedy NMS is solved in the same
vectorised rounds, and the first-claim painting is one ``scatter_reduce`` (amin). Only the painted image
(one int32 per field pixel) comes back to the host, where it is split into 4-connected fragments exactly as
``nms.paint`` does (``nms.fragments``). On the CPU the same code runs, so tests assert equality with numpy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..instances.nms import fragments, subset_rows

CHUNK_BYTES = 256 * 2**20  # largest float32 masks x columns chunk of the overlap product


def csr_take(ptr: torch.Tensor, pixels: torch.Tensor, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(ptr, pixels) of the selected rows of a CSR pixel list on the device, in the order of ``rows``."""
    if len(rows) == len(ptr) - 1 and np.array_equal(rows, np.arange(len(rows))):
        return ptr, pixels
    rows_t = torch.as_tensor(np.ascontiguousarray(rows, np.int64), device=pixels.device)
    lengths = (ptr[1:] - ptr[:-1])[rows_t]
    out = torch.zeros(len(rows) + 1, dtype=torch.int64, device=pixels.device)
    torch.cumsum(lengths, 0, out=out[1:])
    owner = torch.repeat_interleave(torch.arange(len(rows), device=pixels.device), lengths)
    return out, pixels[ptr[rows_t][owner] + (torch.arange(len(owner), device=pixels.device) - out[:-1][owner])]


@dataclass
class DeviceCandidates:
    """``instances.nms.Candidates`` with the pixel lists (``ptr``, ``pixels``) as tensors on the device; the
    per-mask scores stay numpy (they are few and the prompt logic reads them)."""

    shape: tuple[int, int]
    ptr: torch.Tensor
    pixels: torch.Tensor
    area: np.ndarray
    iou: np.ndarray
    stability: np.ndarray
    bbox: np.ndarray
    point: np.ndarray

    def __len__(self) -> int:
        return len(self.area)

    @classmethod
    def concat(cls, shape: tuple[int, int], parts: list[tuple], device: torch.device) -> "DeviceCandidates":
        """One field's candidates from batches ``(ptr, pixels, area, iou, stability, bbox, point)``."""
        if not parts:
            z = np.zeros(0)
            return cls(tuple(shape), torch.zeros(1, dtype=torch.int64, device=device),
                       torch.zeros(0, dtype=torch.int64, device=device), z.astype(np.int64), z.astype(np.float32),
                       z.astype(np.float32), np.zeros((0, 4), np.int64), np.zeros((0, 2)))
        ptrs, pixels, area, iou, stability, bbox, point = zip(*parts)
        offsets = np.cumsum([0] + [p[-1] for p in ptrs[:-1]])
        ptr = np.concatenate([[0]] + [p[1:] + o for p, o in zip(ptrs, offsets)]).astype(np.int64)
        return cls(tuple(shape), torch.as_tensor(ptr, device=device), torch.cat(pixels), np.concatenate(area),
                   np.concatenate(iou), np.concatenate(stability), np.concatenate(bbox), np.concatenate(point))

    def subset(self, keep: np.ndarray) -> "DeviceCandidates":
        return subset_rows(self, keep, csr_take)

    def lengths(self) -> torch.Tensor:
        return self.ptr[1:] - self.ptr[:-1]


def intersections(c: DeviceCandidates) -> torch.Tensor:
    """(n, n) int64 pixel counts shared by every pair of masks (the diagonal is each mask's area)."""
    n, size = len(c), int(np.prod(c.shape))
    dev = c.pixels.device
    acc = torch.zeros((n, n), dtype=torch.int64, device=dev)
    if n < 2 or len(c.pixels) == 0:
        return acc
    owner = torch.repeat_interleave(torch.arange(n, device=dev), c.lengths())
    width = int(min(1 << 16, max(1024, CHUNK_BYTES // (4 * n))))
    chunk = c.pixels // width  # pixels are sorted within a mask, not across masks: group them by chunk once
    by_chunk = torch.argsort(chunk, stable=True)
    counts = torch.bincount(chunk, minlength=-(-size // width)).tolist()
    start = 0
    for k, m in enumerate(counts):
        if m:
            sel = by_chunk[start:start + m]
            x = torch.zeros((n, width), dtype=torch.float32, device=dev)
            x[owner[sel], c.pixels[sel] - k * width] = 1.0
            acc += (x @ x.T).round().to(torch.int64)
        start += m
    return acc


def greedy_nms(scores: np.ndarray, suppress: torch.Tensor) -> np.ndarray:
    """``instances.nms.greedy_nms`` for a dense (n, n) boolean matrix of suppressing pairs on the device."""
    n = len(scores)
    dev = suppress.device
    order = np.lexsort((np.arange(n), -np.asarray(scores, np.float64)))
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    rank_t = torch.as_tensor(rank, device=dev)
    above = rank_t[:, None] < rank_t[None, :]  # src ranked above dst
    edges = (suppress | suppress.T) & above  # edges[src, dst]
    state = torch.zeros(n, dtype=torch.int8, device=dev)  # 0 undecided, 1 kept, 2 suppressed
    while True:
        und = state == 0
        if not bool(und.any()):
            break
        hit = (edges & (state == 1)[:, None]).any(0)
        wait = (edges & (state == 0)[:, None]).any(0)
        state = torch.where(und & hit, torch.full_like(state, 2), state)
        state = torch.where(und & ~hit & ~wait, torch.ones_like(state), state)
    kept = np.flatnonzero(state.cpu().numpy() == 1)
    return kept[np.argsort(rank[kept], kind="stable")]


def mask_nms(c: DeviceCandidates, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy NMS on mask IoU (pairs with IoU > ``threshold`` suppress), as ``instances.nms.mask_nms``."""
    if len(c) == 0:
        return np.zeros(0, np.int64)
    inter = intersections(c)
    area = torch.as_tensor(c.area, device=inter.device)
    union = area[:, None] + area[None, :] - inter
    iou = inter.double() / union.clamp(min=1).double()
    suppress = torch.triu(iou > threshold, diagonal=1) & (inter > 0)
    return greedy_nms(scores, suppress)


def paint(c: DeviceCandidates, order: np.ndarray, min_size: int = 0, drop_largest: bool = False) -> np.ndarray:
    """``instances.nms.paint``: first claim (smallest paint rank) per pixel on the device, then fragments."""
    h, w = c.shape
    dev = c.pixels.device
    none = len(c)  # masks not in ``order`` carry it: they never claim
    seg = torch.zeros(h * w, dtype=torch.int32, device=dev)
    if len(order):
        rank_of = torch.full((len(c),), none, dtype=torch.int32, device=dev)
        rank_of[torch.as_tensor(np.ascontiguousarray(order, np.int64), device=dev)] = torch.arange(
            len(order), dtype=torch.int32, device=dev)
        best = torch.full((h * w,), none, dtype=torch.int32, device=dev)
        best.scatter_reduce_(0, c.pixels, torch.repeat_interleave(rank_of, c.lengths()), "amin")
        seg = torch.where(best != none, best + 1, seg)
    return fragments(seg.cpu().numpy().astype(np.uint32).reshape(h, w), min_size, drop_largest)


def assemble(cand: DeviceCandidates, scores: np.ndarray, nms_threshold: float, min_size: int,
             drop_largest: bool = False) -> np.ndarray:
    """``instances.apg.assemble`` on the device: NMS, then paint the kept masks largest first."""
    keep = mask_nms(cand, scores, nms_threshold)
    order = keep[np.argsort(-cand.area[keep], kind="stable")]
    return paint(cand, order, min_size, drop_largest)
