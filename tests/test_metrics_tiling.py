import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from pipeline_lib.measure.metrics import segmentation_scores
from pipeline_lib.tiling import block_grid, face_pairs


def dense_reference(pred, true):
    """Dense IoU matrix + Hungarian per threshold (slow, obviously correct)."""
    pids, tids = np.unique(pred)[1:], np.unique(true)[1:]
    iou = np.zeros((len(pids), len(tids)))
    for i, p in enumerate(pids):
        for j, t in enumerate(tids):
            a, b = pred == p, true == t
            iou[i, j] = (a & b).sum() / (a | b).sum()
    sa = []
    for thr in np.arange(0.5, 1.0, 0.05):
        m = np.where(iou >= thr - 1e-12, iou, 0)
        r, c = linear_sum_assignment(-m)
        tp = int((m[r, c] > 0).sum())
        sa.append(tp / (len(pids) + len(tids) - tp))
    return np.mean(sa)


def test_msa_matches_dense_reference():
    from pipeline_lib.io.synthetic import blob_field
    _, true = blob_field((120, 150), 25, seed=4)
    rng = np.random.default_rng(0)
    pred = np.roll(true, 1, axis=1).copy()
    pred[pred == 3] = 0
    pred[(pred == 5) & (rng.random(pred.shape) < 0.5)] = 40
    s = segmentation_scores(pred, true)
    assert s["msa"] == pytest.approx(dense_reference(pred, true))
    assert segmentation_scores(true, true)["msa"] == 1.0
    assert segmentation_scores(true, true)["error_rate"] == 0.0


def test_block_grid_covers_exactly():
    shape = (130, 77)
    cover = np.zeros(shape, int)
    blocks = block_grid(shape, 32, 8)
    for b in blocks:
        cover[b.inner] += 1
        assert all(o.start <= i.start and o.stop >= i.stop for o, i in zip(b.outer, b.inner))
    assert (cover == 1).all()
    assert len(list(face_pairs(blocks))) == 4 * 3 + 5 * 2
    assert len(block_grid((10, 10), 512, 64)) == 1
    assert block_grid((10, 10), 512, 64)[0].outer == (slice(0, 10), slice(0, 10))
