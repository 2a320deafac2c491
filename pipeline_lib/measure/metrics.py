"""Segmentation accuracy against ground truth: mSA, SA50 and error rate, by sparse overlap counting.

Objects are matched one-to-one by IoU. For thresholds >= 0.5 a pair can only match one partner when
IoU > 0.5, so the matching is exact; ties at exactly 0.5 are resolved optimally (Hungarian on the few
conflicting pairs). Overlaps come from one pass over the pixels (no dense N x M masks).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)


@dataclass
class Overlaps:
    """Pixel counts of a prediction against ground truth: sizes of every object and of every overlap.

    Counts are additive, so the counts of disjoint blocks of an image combine with ``merge_overlaps``
    into exactly the counts of the whole image (memory bounded by the block, not the field).
    """

    pairs: pd.DataFrame  # columns pred, true, n (overlapping pixels)
    pred_sizes: pd.Series  # pixels per predicted id (index)
    true_sizes: pd.Series  # pixels per true id (index)


def _sizes(ids: np.ndarray) -> pd.Series:
    u, n = np.unique(ids[ids > 0], return_counts=True)
    return pd.Series(n, index=u)


def count_overlaps(pred: np.ndarray, true: np.ndarray) -> Overlaps:
    """Overlap counts of two label images (or two same-shaped blocks of them), one pass over the pixels."""
    p = np.asarray(pred).ravel().astype(np.int64)
    t = np.asarray(true).ravel().astype(np.int64)
    both = (p > 0) & (t > 0)
    base = int(t.max()) + 1 if t.size else 1
    uniq, inter = np.unique(p[both] * base + t[both], return_counts=True)
    pi, ti = np.divmod(uniq, base)
    return Overlaps(pd.DataFrame({"pred": pi, "true": ti, "n": inter}), _sizes(p), _sizes(t))


def merge_overlaps(parts: list[Overlaps]) -> Overlaps:
    """The counts of the union of disjoint blocks."""
    pairs = pd.concat([o.pairs for o in parts], ignore_index=True).groupby(["pred", "true"], as_index=False)["n"].sum()
    add = (lambda ss: pd.concat(ss).groupby(level=0).sum() if ss else pd.Series(dtype=np.int64))
    return Overlaps(pairs, add([o.pred_sizes for o in parts]), add([o.true_sizes for o in parts]))


def _iou_pairs(o: Overlaps):
    pi, ti, inter = (o.pairs[c].to_numpy(np.int64) for c in ("pred", "true", "n"))
    iou = inter / (o.pred_sizes.reindex(pi).to_numpy() + o.true_sizes.reindex(ti).to_numpy() - inter)
    return pi, ti, iou, len(o.pred_sizes), len(o.true_sizes)


def _true_positives(pi, ti, iou, thr: float) -> int:
    sel = iou >= thr
    a, b, w = pi[sel], ti[sel], iou[sel]
    if len(np.unique(a)) == len(a) and len(np.unique(b)) == len(b):
        return int(sel.sum())
    ua, ia = np.unique(a, return_inverse=True)
    ub, ib = np.unique(b, return_inverse=True)
    cost = np.zeros((len(ua), len(ub)))
    cost[ia, ib] = -w
    r, c = linear_sum_assignment(cost)
    return int((cost[r, c] < 0).sum())


def segmentation_scores(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """mSA (mean of SA over IoU 0.50..0.95), SA50, error rate at 0.5, and counts."""
    return scores_from_overlaps(count_overlaps(pred, true))


def scores_from_overlaps(o: Overlaps) -> dict[str, float]:
    """The scores of ``segmentation_scores`` from (possibly blockwise merged) overlap counts."""
    pi, ti, iou, n_pred, n_true = _iou_pairs(o)
    sa = []
    tp50 = 0
    for thr in THRESHOLDS:
        tp = _true_positives(pi, ti, iou, thr)
        if thr == 0.5:
            tp50 = tp
        denom = n_pred + n_true - tp
        sa.append(tp / denom if denom else 1.0)
    fp, fn = n_pred - tp50, n_true - tp50
    return {"msa": float(np.mean(sa)), "sa50": float(sa[0]),
            "error_rate": float((fn + fp) / n_true) if n_true else float(fp > 0),
            "n_pred": n_pred, "n_true": n_true, "tp50": tp50}


def mean_segmentation_accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    return segmentation_scores(pred, true)["msa"]
