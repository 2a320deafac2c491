"""The torch NMS and painting of ``embed.device_masks`` (run on the decoder's device) equal the numpy path of
``instances.nms``; run on the CPU here, the same code a GPU runs."""
import numpy as np
import pytest
import torch

from pipeline_lib.embed import device_masks as dm
from pipeline_lib.embed.oracle import oracle_maps
from pipeline_lib.embed.prompt_decoder import PromptDecoder, decode_points
from pipeline_lib.instances.apg import apg_segment, assemble
from pipeline_lib.instances.nms import Candidates, mask_nms
from pipeline_lib.io.synthetic import blob_field
from pipeline_lib.models.tiny import build_tiny
from pipeline_lib.tiling import block_grid


def _candidates(seed, n=50, shape=(60, 80)):
    """Random rectangles and discs, with near-duplicates (NMS chains) and score ties."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    parts = []
    for k in range(n):
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        r = rng.integers(2, 25)
        m = (yy - y) ** 2 + (xx - x) ** 2 < r * r if k % 2 else (abs(yy - y) < r) & (abs(xx - x) < r // 2 + 1)
        for dup in range(1 + (rng.random() < 0.4)):
            mm = m.copy()
            if dup:
                mm[y, :] = False
            pix = np.flatnonzero(mm)
            parts.append((np.array([0, len(pix)]), pix, np.array([len(pix)]),
                          np.round(rng.random(1), 1).astype(np.float32), np.ones(1, np.float32),
                          np.zeros((1, 4), np.int64), np.zeros((1, 2))))
    return Candidates.concat(shape, parts)


def _on_device(c):
    return dm.DeviceCandidates(c.shape, torch.as_tensor(c.ptr), torch.as_tensor(c.pixels), c.area, c.iou,
                               c.stability, c.bbox, c.point)


@pytest.mark.parametrize("seed", range(2))
def test_device_nms_and_paint_equal_numpy(seed):
    c = _candidates(seed)
    d = _on_device(c)
    for thr in (0.3, 0.7, 0.9):
        assert np.array_equal(dm.mask_nms(d, c.iou, thr), mask_nms(c, c.iou, thr))
    for drop_largest in (False, True):
        ref = assemble(c, c.iou, 0.7, 10, drop_largest)
        assert ref.max() > 5
        assert np.array_equal(dm.assemble(d, c.iou, 0.7, 10, drop_largest), ref)
    keep = np.flatnonzero(c.area > 50)[::-1]
    sub, dsub = c.subset(keep), d.subset(keep)
    assert np.array_equal(dsub.ptr.numpy(), sub.ptr) and np.array_equal(dsub.pixels.numpy(), sub.pixels)


def test_device_intersections_over_column_chunks(monkeypatch):
    c = _candidates(5)
    monkeypatch.setattr(dm, "CHUNK_BYTES", 4 * len(c) * 1024)  # 1024-pixel chunks: 7 of them
    dense = np.zeros((len(c), c.shape[0] * c.shape[1]), np.int64)
    dense[c.owners(), c.pixels] = 1
    assert np.array_equal(dm.intersections(_on_device(c)).numpy(), dense @ dense.T)


def test_apg_with_candidates_on_device_equals_numpy_path():
    img, lab = blob_field((100, 120), n=12, seed=3)
    sam, _ = build_tiny(0)
    pd = PromptDecoder(sam)
    blocks = block_grid(img.shape, 128)
    with torch.no_grad():
        pd.set_tiles(torch.randn(len(blocks), 256, 64, 64))
    maps = oracle_maps(lab)
    runs = [apg_segment(maps, 128, lambda t, p, dev=dev: decode_points(pd, blocks, img.shape, t, p, 16, on_device=dev),
                        assemble=dm.assemble if dev else assemble)[0] for dev in (False, True)]
    assert runs[0].max() > 3 and np.array_equal(runs[0], runs[1])
