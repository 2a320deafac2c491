"""Segmentation accuracy against ground truth: mSA, SA50 and error rate, by sparse overlap counting.

Objects are matched one-to-one by IoU. For thresholds >= 0.5 a pair can only match one partner when
IoU > 0.5, so the matching is exact; ties at exactly 0.5 are resolved optimally (Hungarian on the few
conflicting pairs). Overlaps come from one pass over the pixels (no dense N x M masks).
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)


def _iou_pairs(pred: np.ndarray, true: np.ndarray):
    p = np.asarray(pred).ravel().astype(np.int64)
    t = np.asarray(true).ravel().astype(np.int64)
    n_p = np.bincount(p)
    n_t = np.bincount(t)
    both = (p > 0) & (t > 0)
    key = p[both] * (int(t.max()) + 1) + t[both]
    uniq, inter = np.unique(key, return_counts=True)
    pi, ti = np.divmod(uniq, int(t.max()) + 1)
    iou = inter / (n_p[pi] + n_t[ti] - inter)
    return pi, ti, iou, int((n_p[1:] > 0).sum()), int((n_t[1:] > 0).sum())


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
    pi, ti, iou, n_pred, n_true = _iou_pairs(pred, true)
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
