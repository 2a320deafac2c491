"""Stitching of instance labels across yx tiles by overlap agreement in the halo.

Each tile is segmented over its inner region plus halo. It keeps its inner labels (the *pieces*) and its
labels in the halo (the *ring*). For two tiles whose halos reach into each other, the band where both have
labels is the union of (A's halo inside B's inner region) and (B's halo inside A's inner region). There each
tile has its own view (its pieces on its inner side, its ring on the other side). A piece of A and a piece
of B are the same object when their IoU over the band reaches the threshold (default 0.5: a unique match).
Objects that merely touch at the seam but were segmented differently stay apart; this is what Cellpose's
distributed mode (merge on contact) gets wrong.
"""
from __future__ import annotations

import numpy as np

Region = tuple[slice, ...]


def intersect(a: Region, b: Region) -> Region | None:
    out = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b))
    return None if any(s.start >= s.stop for s in out) else out


def local(region: Region, origin: Region) -> Region:
    """``region`` in coordinates relative to the start of ``origin``."""
    return tuple(slice(r.start - o.start, r.stop - o.start) for r, o in zip(region, origin))


def split_unit(labels: np.ndarray, inner_local: Region) -> tuple[np.ndarray, np.ndarray, int]:
    """Renumber a tile's labels (outer region) so its inner ids are 1..n and halo-only ids follow.

    Returns (pieces: the inner region, uint32 1..n; ring: the outer region with the inner zeroed, same
    numbering; n).
    """
    lab = labels.astype(np.int64, copy=False)
    inner = lab[inner_local]
    ids_in = np.unique(inner)
    ids_in = ids_in[ids_in > 0]
    ids_all = np.unique(lab)
    ids_all = ids_all[ids_all > 0]
    ids_out = np.setdiff1d(ids_all, ids_in, assume_unique=True)
    lut = np.zeros(int(ids_all.max()) + 1 if ids_all.size else 1, dtype=np.uint32)
    lut[ids_in] = np.arange(1, len(ids_in) + 1, dtype=np.uint32)
    lut[ids_out] = np.arange(len(ids_in) + 1, len(ids_all) + 1, dtype=np.uint32)
    ring = lut[lab]
    pieces = ring[inner_local].copy()
    ring[inner_local] = 0
    return pieces, ring, len(ids_in)


def band_matches(view_a: np.ndarray, view_b: np.ndarray, n_a: int, n_b: int,
                 threshold: float = 0.5) -> np.ndarray:
    """(k, 2) pairs (piece of A, piece of B) whose IoU over the band is >= ``threshold``.

    ``view_a`` and ``view_b`` are the two tiles' labels over the same band pixels (flat, any int dtype);
    ids above ``n_a`` / ``n_b`` are halo-only objects, which take part in the IoU but are never joined.
    """
    a = view_a.astype(np.int64, copy=False).ravel()
    b = view_b.astype(np.int64, copy=False).ravel()
    both = (a > 0) & (b > 0)
    if not both.any():
        return np.zeros((0, 2), dtype=np.int64)
    size_a = np.bincount(a)
    size_b = np.bincount(b)
    m = int(b.max()) + 1
    key, inter = np.unique(a[both] * m + b[both], return_counts=True)
    ia, ib = np.divmod(key, m)
    iou = inter / (size_a[ia] + size_b[ib] - inter)
    keep = (iou >= threshold) & (ia <= n_a) & (ib <= n_b)
    return np.stack([ia[keep], ib[keep]], axis=1)
