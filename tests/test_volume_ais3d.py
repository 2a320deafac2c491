"""AIS on a stack of per-slice maps (instances.ais3d) and the data-derived merge gap (merge3d.resolve_max_gap)."""
from dataclasses import replace

import numpy as np
import pytest

from pipeline_lib.embed.oracle import oracle_maps
from pipeline_lib.instances.ais import AISParams, ais_single
from pipeline_lib.instances.ais3d import ais_stack, foreground_3d, z_halo
from pipeline_lib.io.synthetic_volume import nuclei_labels
from pipeline_lib.measure.metrics import segmentation_scores
from pipeline_lib.stitch.merge3d import Merge3DParams, merge_slices_3d, relabel_slices, resolve_max_gap


def ball(shape, center, radii):
    g = np.indices(shape)
    return sum(((g[i] - c) / r) ** 2 for i, c, r in zip(range(3), center, radii)) <= 1


def slice_maps(gt):
    return np.stack([oracle_maps(gt[z]) for z in range(gt.shape[0])], axis=1).astype(np.float32)


def unique_ids(per_slice):
    per = per_slice.astype(np.int64)
    off = np.concatenate([[0], np.cumsum(per.reshape(len(per), -1).max(axis=1))[:-1]])
    return np.where(per > 0, per + off[:, None, None], 0)


def test_stack_keeps_the_caps_that_per_slice_ais_loses():
    gt = np.zeros((15, 40, 40), np.uint32)
    gt[ball(gt.shape, (7, 20, 20), (6.05, 12, 12))] = 1  # caps of radius ~1.5 px
    maps = slice_maps(gt)
    p = AISParams()
    per = np.stack([ais_single(maps[:, z], p) for z in range(15)])
    stack = ais_stack(maps, p, anisotropy=2.0)
    assert stack.dtype == np.uint32 and stack.shape == gt.shape
    z_gt = np.flatnonzero(gt.any(axis=(1, 2)))
    assert np.array_equal(np.flatnonzero(stack.any(axis=(1, 2))), z_gt)  # every slice, caps included
    assert len(np.flatnonzero(per.any(axis=(1, 2)))) < len(z_gt)  # micro-sam's smoothing drops the caps
    assert np.array_equal(stack > 0, gt > 0)  # the raw map gives the extent
    merged = merge_slices_3d(unique_ids(stack), Merge3DParams(anisotropy=2.0))
    assert segmentation_scores(merged, gt)["msa"] == 1.0


def test_foreground_needs_a_core_or_two_slices():
    fg = np.zeros((5, 30, 30), np.float32)
    fg[2, 5, 5] = 1.0  # one pixel in one slice: noise of a per-slice prediction
    fg[1:3, 20:22, 20] = 1.0  # two pixels in each of two slices: z-consistent, kept
    fg[1:3, 25, 25] = 1.0  # one pixel in two slices: a chance pair of noise pixels
    fg[2, 10:18, 10:18] = 1.0  # large in one slice: has a smoothed core where z is coarse
    out = foreground_3d(fg, AISParams(), anisotropy=3.0)
    assert not out[2, 5, 5] and out[1:3, 20:22, 20].all() and out[2, 10:18, 10:18].all()
    assert not out[1:3, 25, 25].any() and out.sum() == 4 + 64
    # isotropic voxels: the core is smoothed in z as in yx, and a one-voxel-thin plate is no object
    assert not foreground_3d(fg, AISParams(), anisotropy=1.0)[2, 10:18, 10:18].any()
    assert z_halo(AISParams(), 1.0) == 4 and z_halo(AISParams(), 5.0) == 2 and z_halo(AISParams(), 100.0) == 2


def test_touching_objects_in_a_slice_are_separated():
    gt = np.zeros((6, 40, 60), np.uint32)
    gt[ball(gt.shape, (2.5, 20, 18), (3, 10, 10))] = 1
    gt[ball(gt.shape, (2.5, 20, 38), (3, 10, 10))] = 2  # touching in yx
    gt[ball(gt.shape, (2.5, 20, 18), (3, 10, 10)) & (gt == 2)] = 1
    stack = ais_stack(slice_maps(gt), AISParams(), anisotropy=3.0)
    merged = merge_slices_3d(unique_ids(stack), Merge3DParams(anisotropy=3.0))
    assert segmentation_scores(merged, gt)["msa"] >= 0.95 and merged.max() == 2


def test_merge_gap_derives_from_object_size_and_anisotropy():
    sizes = np.array([0] + [int(np.pi * 10 ** 2)] * 50)  # 2D objects of diameter ~20 px
    p = Merge3DParams()  # max_gap 2, max_gap_scale 0.2
    assert resolve_max_gap(sizes, replace(p, anisotropy=1.0)).max_gap == 2  # ~20 slices per object
    assert resolve_max_gap(sizes, replace(p, anisotropy=3.0)).max_gap == 1  # ~6.7 slices
    assert resolve_max_gap(sizes, replace(p, anisotropy=5.0)).max_gap == 0  # ~4 slices: no skip links
    assert resolve_max_gap(sizes, replace(p, anisotropy=5.0, max_gap_scale=0)).max_gap == 2
    assert resolve_max_gap(sizes, replace(p, rule="micro_sam", anisotropy=5.0)).max_gap == 2  # not used
    r = resolve_max_gap(sizes, replace(p, anisotropy=3.0))
    assert r.max_gap_scale == 0 and resolve_max_gap(sizes, r) == r  # idempotent
    with pytest.raises(ValueError, match="anisotropy"):
        Merge3DParams(anisotropy=0)


@pytest.mark.parametrize("ratio", [1, 3, 5])
def test_ground_truth_slices_with_coarse_z(ratio):
    """Stacked, often touching nuclei, z spacing 1x/3x/5x the yx spacing: the default merge of perfect
    slices >= 0.95 mSA; with the configured gap at 5x, skip links chain stacked nuclei (measured 0.77)."""
    cz = max(2, round(24 / ratio))
    shape = (36, 96, 96)
    gt = nuclei_labels(tuple(slice(0, s) for s in shape), shape, cell=(cz, 24, 24))
    clean = relabel_slices(gt)
    p = Merge3DParams(anisotropy=24 / cz)
    assert segmentation_scores(merge_slices_3d(clean, p), gt)["msa"] >= 0.95
    if ratio == 5:
        assert segmentation_scores(merge_slices_3d(clean, replace(p, max_gap_scale=0)), gt)["msa"] < 0.9
