"""Agreement between the label images of two methods on one field: mSA and SA50 of one against the other.

The scores are the ground-truth scores of measure/metrics.py with one method's labels standing in for the
ground truth. Direction: ``scores(b, reference=a)`` treats ``a`` as the truth. mSA and SA50 are symmetric
in the two images (IoU and the one-to-one matching do not depend on which side is the reference, and
SA = TP / (TP + FP + FN) only swaps FP and FN), so both directions give the same number up to the
choice among equally good matchings at an IoU of exactly 0.5. We compute both directions from the same
overlap counts (no second pass over the pixels) and report their mean as the agreement; the error rate
(FP + FN over the reference's objects) is the one asymmetric score and is left out.

Memory is bounded by one block of each image: the overlaps are counted per block and summed
(``merge_overlaps``), which is exact because the counts are additive over disjoint blocks. Inputs may be
numpy arrays or lazy arrays (zarr, ``LeadingView``) that support slicing; every image is read once per
block, whatever the number of method pairs.
"""
from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

import numpy as np

from .metrics import Overlaps, count_overlaps, merge_overlaps, scores_from_overlaps

#: Pixels of one block per image (2048 x 2048 in 2D); a 10k x 10k field is read in 25 blocks.
BLOCK_PIXELS = 2048 * 2048
#: Block overlap counts summed into one after this many blocks (keeps the pair tables small).
_MERGE_EVERY = 16


def block_shape(shape: Sequence[int], max_pixels: int = BLOCK_PIXELS) -> tuple[int, ...]:
    """Block sides for an image of ``shape``: the last two axes up to sqrt(max_pixels) each, the leading
    (z) axes as many planes as still fit in ``max_pixels``."""
    side = max(1, int(np.sqrt(max_pixels)))
    yx = tuple(min(int(s), side) for s in shape[-2:])
    lead = []
    room = max(1, max_pixels // max(1, int(np.prod(yx))))
    for s in shape[:-2]:
        n = max(1, min(int(s), room))
        lead.append(n)
        room = max(1, room // n)
    return (*lead, *yx)


def _blocks(shape: Sequence[int], block: Sequence[int]):
    starts = [range(0, int(s), int(b)) for s, b in zip(shape, block)]
    for origin in itertools.product(*starts):
        yield tuple(slice(o, o + b) for o, b in zip(origin, block))


def _swap(o: Overlaps) -> Overlaps:
    """The same counts with the roles of prediction and reference exchanged."""
    pairs = o.pairs.rename(columns={"pred": "true", "true": "pred"})[["pred", "true", "n"]]
    return Overlaps(pairs, o.true_sizes, o.pred_sizes)


def agreement_from_overlaps(o: Overlaps) -> dict[str, Any]:
    """Agreement of two label images from their overlap counts (``pred`` = b, ``true`` = a).

    ``msa``/``sa50``: mean of both directions; ``msa_b_vs_a``/``msa_a_vs_b``: each direction (b scored with
    a as reference, and the reverse); ``n_a``/``n_b``: objects in each image.
    """
    b_vs_a = scores_from_overlaps(o)
    a_vs_b = scores_from_overlaps(_swap(o))
    return {"msa": (b_vs_a["msa"] + a_vs_b["msa"]) / 2, "sa50": (b_vs_a["sa50"] + a_vs_b["sa50"]) / 2,
            "msa_b_vs_a": b_vs_a["msa"], "msa_a_vs_b": a_vs_b["msa"],
            "n_a": int(b_vs_a["n_true"]), "n_b": int(b_vs_a["n_pred"]), "tp50": int(b_vs_a["tp50"])}


def pairwise_overlaps(images: Mapping[str, Any], pairs: Sequence[tuple[str, str]] | None = None,
                      max_pixels: int = BLOCK_PIXELS) -> dict[tuple[str, str], Overlaps]:
    """Overlap counts of every pair ``(a, b)`` of the named label images (default: all pairs in order),
    reading each image once, block by block. ``Overlaps.true`` is ``a``, ``Overlaps.pred`` is ``b``."""
    names = list(images)
    pairs = list(pairs) if pairs is not None else list(itertools.combinations(names, 2))
    needed = sorted({n for p in pairs for n in p}, key=names.index)
    shapes = {n: tuple(int(s) for s in images[n].shape) for n in needed}
    if len(set(shapes.values())) > 1:
        raise ValueError("label images of different shapes cannot be compared: "
                         + ", ".join(f"{n} {s}" for n, s in shapes.items()))
    shape = shapes[needed[0]] if needed else ()
    parts: dict[tuple[str, str], list[Overlaps]] = {p: [] for p in pairs}
    for region in _blocks(shape, block_shape(shape, max_pixels)):
        block = {n: np.asarray(images[n][region]) for n in needed}
        for a, b in pairs:
            acc = parts[(a, b)]
            acc.append(count_overlaps(block[b], block[a]))
            if len(acc) >= _MERGE_EVERY:
                parts[(a, b)] = [merge_overlaps(acc)]
    return {p: merge_overlaps(v) if v else count_overlaps(np.zeros(0), np.zeros(0)) for p, v in parts.items()}


def pairwise_agreement(images: Mapping[str, Any], pairs: Sequence[tuple[str, str]] | None = None,
                       max_pixels: int = BLOCK_PIXELS) -> dict[tuple[str, str], dict[str, Any]]:
    """``agreement_from_overlaps`` of every pair of the named label images (same shape, any ndim >= 2)."""
    return {p: agreement_from_overlaps(o) for p, o in pairwise_overlaps(images, pairs, max_pixels).items()}


def label_agreement(a: Any, b: Any, max_pixels: int = BLOCK_PIXELS) -> dict[str, Any]:
    """Agreement of label images ``a`` and ``b`` (see ``agreement_from_overlaps``)."""
    return pairwise_agreement({"a": a, "b": b}, [("a", "b")], max_pixels)[("a", "b")]
