"""APG/AMG instance assembly: prompts, sparse mask NMS, painting, and tiled == untiled."""
import numpy as np
import pytest
import zarr
from scipy import ndimage
from skimage.segmentation import find_boundaries

from pipeline_lib.embed.oracle import oracle_maps
from pipeline_lib.instances.apg import amg_points, apg_segment, tile_of_points
from pipeline_lib.instances.nms import Candidates, greedy_nms, mask_nms, paint
from pipeline_lib.instances.prompts import apg_points, component_centers, grid_points
from pipeline_lib.io.synthetic import blob_field
from pipeline_lib.measure.metrics import mean_segmentation_accuracy as msa
from pipeline_lib.tiling import block_grid


def _micro_sam_centers(mask):
    """micro-sam 1.8.14 ``_get_centers`` (exact distance transform instead of its blockwise one)."""
    from skimage.measure import label, regionprops
    seg = label(mask, connectivity=1)
    boundaries = find_boundaries(seg, mode="outer") == 0
    boundaries[0, :] = boundaries[:, 0] = boundaries[-1, :] = boundaries[:, -1] = False
    dist = ndimage.distance_transform_edt(boundaries)
    out = []
    for p in regionprops(seg):
        bb = np.s_[p.bbox[0]:p.bbox[2], p.bbox[1]:p.bbox[3]]
        d = dist[bb].copy()
        d[seg[bb] != p.label] = 0
        c = np.unravel_index(np.argmax(d), d.shape)
        out.append((c[0] + bb[0].start, c[1] + bb[1].start))
    return np.array(out).reshape(-1, 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_component_centers_equal_micro_sam_loop(seed):
    rng = np.random.default_rng(seed)
    mask = ndimage.binary_opening(rng.random((90, 120)) > 0.45)
    mask[:5, :30] = True  # touches the border
    mask[40:44, 60:64] = True  # a square: many ties
    assert np.array_equal(component_centers(mask), _micro_sam_centers(mask))


def test_apg_points_one_per_object_inside_it():
    _, labels = blob_field((200, 240), n=25, seed=3)
    pts = apg_points(oracle_maps(labels))
    hit = labels[pts[:, 0], pts[:, 1]]
    assert np.all(hit > 0)
    assert len(np.unique(hit)) == len(hit)


def _sequential_nms(scores, iou, thr):
    order = sorted(range(len(scores)), key=lambda k: (-scores[k], k))
    keep = []
    while order:
        i = order.pop(0)
        keep.append(i)
        order = [j for j in order if iou[i, j] <= thr]
    return keep


def _random_candidates(rng, n=60, shape=(64, 80)):
    parts = []
    for _ in range(n):
        y0, x0 = rng.integers(0, shape[0] - 8), rng.integers(0, shape[1] - 8)
        h, w = rng.integers(3, 20, size=2)
        m = np.zeros(shape, bool)
        m[y0:y0 + h, x0:x0 + w] = True
        if rng.random() < 0.5:  # near-duplicates to make NMS chains
            m[y0:y0 + h, x0:x0 + w - 1] = True
        pix = np.flatnonzero(m)
        parts.append((np.array([0, len(pix)]), pix, np.array([len(pix)]), rng.random(1).astype(np.float32),
                      np.ones(1, np.float32), np.zeros((1, 4), np.int64), np.zeros((1, 2))))
    c = Candidates.concat(shape, parts)
    dense = np.zeros((n, shape[0] * shape[1]), bool)
    for k in range(n):
        dense[k, c.pixels[c.ptr[k]:c.ptr[k + 1]]] = True
    return c, dense


@pytest.mark.parametrize("seed", range(4))
def test_sparse_mask_nms_equals_sequential_greedy(seed):
    rng = np.random.default_rng(seed)
    c, dense = _random_candidates(rng)
    inter = dense.astype(int) @ dense.T.astype(int)
    union = dense.sum(1)[:, None] + dense.sum(1)[None] - inter
    iou = inter / union
    scores = np.round(rng.random(len(c)), 1)  # ties on purpose
    for thr in (0.3, 0.6, 0.9):
        assert list(mask_nms(c, scores, thr)) == _sequential_nms(scores, iou, thr)


def test_greedy_nms_long_chain():
    n = 50  # each suppresses the next: keep every other one
    i, j = np.arange(n - 1), np.arange(1, n)
    kept = greedy_nms(np.linspace(1, 0, n), i, j, np.ones(n - 1, bool))
    assert list(kept) == list(range(0, n, 2))


@pytest.mark.parametrize("drop_largest", [False, True])
def test_paint_equals_micro_sam_mask_data_to_segmentation(drop_largest):
    from skimage.measure import label
    rng = np.random.default_rng(7)
    c, dense = _random_candidates(rng, n=40)
    order = np.argsort(-c.area, kind="stable")
    got = paint(c, order, min_size=6, drop_largest=drop_largest)
    seg = np.zeros(c.shape, np.uint32)
    for k, i in enumerate(order):
        m = dense[i].reshape(c.shape) & (seg == 0)
        seg[m] = k + 1
    seg = label(seg, connectivity=1)
    ids, sizes = np.unique(seg, return_counts=True)
    drop = list(ids[sizes < 6])
    if drop_largest:
        drop.append(ids[np.argmax(sizes)])
    seg[np.isin(seg, drop)] = 0
    assert msa(got, seg) == 1.0 and got.max() == len(np.unique(seg)) - 1


def _oracle_decode(labels, blocks):
    """Decode a point to the true object under it, clipped to the tile (+halo) that decodes it."""
    def decode(tile, pts):
        parts = []
        for t, (y, x) in zip(tile, pts.astype(int)):
            m = np.zeros(labels.shape, bool)
            sl = blocks[t].outer
            m[sl] = labels[sl] == labels[y, x]
            pix = np.flatnonzero(m)
            parts.append((np.array([0, len(pix)]), pix, np.array([len(pix)]), np.ones(1, np.float32),
                          np.ones(1, np.float32), np.zeros((1, 4), np.int64), np.array([[y, x]], float)))
        return Candidates.concat(labels.shape, parts)
    return decode


def _tiled_vs_untiled(labels, tile, halo):
    maps = oracle_maps(labels)
    whole = block_grid(labels.shape, max(labels.shape))
    untiled, _ = apg_segment(maps, max(labels.shape), _oracle_decode(labels, whole))
    blocks = block_grid(labels.shape, tile, halo)
    tiled, info = apg_segment(maps, tile, _oracle_decode(labels, blocks))
    return untiled, tiled


def test_tiled_apg_equals_untiled_synthetic():
    _, labels = blob_field((300, 340), n=60, seed=5)
    untiled, tiled = _tiled_vs_untiled(labels, 64, 24)
    assert msa(tiled, untiled) >= 0.99


def test_tiled_apg_equals_untiled_real_field(real_plate):
    gt = np.asarray(zarr.open_array(f"{real_plate}/A/9/0/labels/nuclei_gt/s0", mode="r"))[0]
    untiled, tiled = _tiled_vs_untiled(gt, 128, 32)
    assert msa(tiled, untiled) >= 0.95
    assert msa(untiled, gt) >= 0.9  # an oracle decoder gives back the ground truth


def test_tile_assignment_and_amg_grid():
    blocks = block_grid((300, 200), 128, 16)
    pts = np.array([[0, 0], [127.9, 128.2], [299, 199], [130, 5]])
    assert list(tile_of_points(pts, (300, 200), 128)) == [0, 1, 5, 2]
    tiles, grid = amg_points(blocks, 4)
    assert len(grid) == 16 * len(blocks)
    for k, b in enumerate(blocks):  # every grid point lies in its own tile's inner region
        g = grid[tiles == k]
        assert np.all((g[:, 0] >= b.inner[0].start) & (g[:, 0] < b.inner[0].stop))
        assert np.all((g[:, 1] >= b.inner[1].start) & (g[:, 1] < b.inner[1].stop))
    assert np.allclose(grid_points((10, 20), 2), [[2.5, 5], [2.5, 15], [7.5, 5], [7.5, 15]])


def test_empty_field_gives_empty_labels():
    labels = np.zeros((70, 90), np.uint32)
    blocks = block_grid(labels.shape, 64, 16)
    out, info = apg_segment(oracle_maps(labels), 64, _oracle_decode(labels, blocks))
    assert info == {"n_prompts": 0, "n_candidates": 0}
    assert out.shape == labels.shape and out.dtype == np.uint32 and out.max() == 0


@pytest.mark.parametrize("seed", range(3))
def test_overlap_counts_bits_equal_sparse_product(seed):
    """All ways of counting mask intersections (sparse product, dense product, packed bits) give the same
    pairs."""
    from pipeline_lib.instances.nms import overlaps
    rng = np.random.default_rng(seed)
    c, dense = _random_candidates(rng, n=70, shape=(90, 130))
    inter = dense.astype(int) @ dense.T.astype(int)
    i, j = np.nonzero(np.triu(inter, k=1))
    for method in ("sparse", "gemm", "bits", "auto"):
        a, b, v = overlaps(c, method)
        o = np.lexsort((b, a))
        assert np.array_equal(a[o], i) and np.array_equal(b[o], j) and np.array_equal(v[o], inter[i, j]), method


def test_overlap_counts_gemm_over_column_chunks():
    """Large masks covering more doubly covered pixels than one float32 column chunk of the dense product."""
    from pipeline_lib.instances.nms import overlaps
    rng = np.random.default_rng(7)
    shape = (200, 260)
    dense = rng.random((12, shape[0] * shape[1])) < 0.6
    dense[3] = dense[2]  # an exact duplicate
    parts = []
    for row in dense:
        pix = np.flatnonzero(row)
        parts.append((np.array([0, len(pix)]), pix, np.array([len(pix)]), np.ones(1, np.float32),
                      np.ones(1, np.float32), np.zeros((1, 4), np.int64), np.zeros((1, 2))))
    c = Candidates.concat(shape, parts)
    inter = dense.astype(np.int64) @ dense.T.astype(np.int64)
    i, j = np.nonzero(np.triu(inter, k=1))
    for method in ("gemm", "bits"):
        a, b, v = overlaps(c, method)
        o = np.lexsort((b, a))
        assert np.array_equal(a[o], i) and np.array_equal(b[o], j) and np.array_equal(v[o], inter[i, j]), method
