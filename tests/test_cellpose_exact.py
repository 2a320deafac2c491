"""cellpose.exact (embed/cellpose_exact.py): blockwise masks identical to untiled masks, close to cellpose's
own compute_masks on the same flows, and its pieces (Euler steps, flow-error diffusion, hole filling) against
cellpose's."""
import numpy as np
import pytest
import torch
import zarr

pytest.importorskip("cellpose", reason="the cellpose extra is part of the test extra")

from cellpose import dynamics, utils  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

from pipeline_lib.embed import cellpose_exact as ce  # noqa: E402
from pipeline_lib.embed.cellpose_dynamics import cellpose_masks, masks_blockwise  # noqa: E402
from pipeline_lib.instances.flows import FlowParams, drop_large, oracle_flows  # noqa: E402
from pipeline_lib.io.synthetic import blob_field  # noqa: E402
from pipeline_lib.measure.metrics import segmentation_scores  # noqa: E402

EXACT = FlowParams(exact=True)


def canonical(labels):
    """Ids in the order of first appearance (raster), 0 stays 0: equal label images up to the ids."""
    flat = np.asarray(labels).ravel().astype(np.int64)
    ids, first = np.unique(flat, return_index=True)
    lut = np.zeros(int(ids.max()) + 1, np.int64)
    fg = ids > 0
    lut[ids[fg][np.argsort(first[fg])]] = np.arange(1, int(fg.sum()) + 1)
    return lut[flat].reshape(np.shape(labels))


def label_flows(labels):
    """Oracle flows as ``embed.cellpose_dynamics.label_flows``, from ``cellpose_exact.mask_flows`` (cellpose's
    diffusion with per-mask step counts: 3x faster than ``masks_to_flows_gpu`` on CPU, and any flows do)."""
    return oracle_flows(labels, ce.mask_flows(canonical(labels)).astype(np.float32))


@pytest.fixture(scope="module")
def synthetic():
    _, lab = blob_field((240, 300), 45, seed=5)
    rng = np.random.default_rng(5)
    flows = label_flows(lab) + rng.normal(0, 0.4, (3,) + lab.shape).astype(np.float32)
    return flows, lab, cellpose_masks(flows, EXACT)


@pytest.mark.parametrize("block,halo", [(80, 64), (128, 96)])
def test_exact_blockwise_equals_untiled(synthetic, block, halo):
    flows, _, full = synthetic
    assert full.max() > 30
    out = np.zeros(full.shape, np.uint32)
    info = masks_blockwise(flows, out, EXACT, block=block, halo=halo)
    assert info["n_blocks"] >= 6 and info["n_joins"] > 0
    assert np.array_equal(canonical(out), canonical(full))
    assert np.array_equal(np.unique(out), np.arange(out.max() + 1))


def test_exact_close_to_compute_masks(synthetic):
    flows, lab, full = synthetic
    ref = cellpose_masks(flows, FlowParams())
    msa = segmentation_scores(full, ref)["msa"]
    print(f"synthetic: mSA exact vs cellpose {msa:.4f}; vs truth exact "
          f"{segmentation_scores(full, lab)['msa']:.4f}, cellpose {segmentation_scores(ref, lab)['msa']:.4f}")
    assert msa >= 0.99


def test_follow_flows_block_equals_field():
    """A block cut from a field at any offset: every path that stays in the block ends where it ends in the
    whole field; paths that leave it are flagged."""
    rng = np.random.default_rng(1)
    dP = np.stack([ndi.gaussian_filter(rng.normal(size=(90, 110)), 4) for _ in range(2)]).astype(np.float32) * 8
    starts = np.stack(np.nonzero(np.ones((90, 110), bool)), axis=1)
    full, esc_full = ce.follow_flows_exact(torch.from_numpy(dP), torch.from_numpy(starts), 60)
    assert not esc_full.any()
    for y0, x0, y1, x1 in [(0, 0, 50, 60), (17, 23, 90, 101), (31, 5, 77, 110)]:
        inside = (starts[:, 0] >= y0) & (starts[:, 0] < y1) & (starts[:, 1] >= x0) & (starts[:, 1] < x1)
        pos, esc = ce.follow_flows_exact(torch.from_numpy(np.ascontiguousarray(dP[:, y0:y1, x0:x1])),
                                         torch.from_numpy(starts[inside] - [y0, x0]), 60, (y0, x0), (90, 110))
        ok = ~esc.numpy()
        assert 0.2 < ok.mean() < 1
        assert np.array_equal(pos.numpy()[ok] + [y0, x0], full.numpy()[inside][ok])


def test_periodic_shortcut_is_exact(synthetic):
    flows = synthetic[0]
    fg = flows[2] > 0
    step = torch.from_numpy(flows[:2] * fg / 5.0)
    starts = torch.from_numpy(np.stack(np.nonzero(fg), axis=1))
    for n in (37, 200):
        a, _ = ce.follow_flows_exact(step, starts, n)
        b, _ = ce.follow_flows_exact(step, starts, n, check_every=10 ** 6)
        assert torch.equal(a, b)


def test_mask_flows_equal_cellpose_for_equal_sizes():
    """Masks with the same bounding-box extent: cellpose's per-window iteration count is each mask's own,
    so the flow-error flows must equal cellpose's (touching masks included)."""
    lab = np.zeros((40, 50), np.int64)
    lab[2:11, 3:12] = 1
    lab[2:11, 12:21] = 2  # touches 1
    yy, xx = np.indices((9, 9))
    lab[20:29, 5:14][(yy - 4) ** 2 + (xx - 4) ** 2 <= 16] = 3
    lab[25:34, 30:39][np.abs(yy - 4) + np.abs(xx - 4) <= 4] = 4
    ref, _ = dynamics.masks_to_flows_gpu(lab)
    assert np.abs(ce.mask_flows(lab) - ref).max() < 1e-9


def test_fill_holes_equals_cellpose():
    rng = np.random.default_rng(3)
    lab = np.zeros((60, 80), np.int64)
    lab[5:25, 5:25] = 1
    lab[10:15, 10:15] = 0  # a hole
    lab[17:20, 17:20] = 2  # a mask inside 1
    lab[30:50, 30:55] = 3
    lab[35:45, 35:50] = 0
    lab[37:43, 38:46] = 4  # nested: 4 in the hole of 3, with a hole of its own
    lab[39:41, 41:43] = 0
    lab[52:55, 60:63] = 5  # small
    lab[5:20, 50:75] = np.where(rng.random((15, 25)) > 0.3, 6, 0)  # ragged, many holes
    ref = utils.fill_holes_and_remove_small_masks(lab.astype(np.int32), min_size=15)
    assert np.array_equal(canonical(ce.fill_and_remove_small(lab, 15)), canonical(ref))


def test_max_size_fraction_of_the_field():
    lab = np.zeros((120, 140), np.int64)
    lab[10:110, 10:110] = 1  # 10000 px > 0.4 * 16800
    lab[20:30, 120:130] = 2
    masks = cellpose_masks(label_flows(lab), EXACT)
    assert masks.max() == 1 and masks[25, 125] == 1
    res = {"n_objects": 2, "label": np.arange(1, 3), "area": np.array([10000, 100]),
           "centroid": np.array([[60.0, 25.0], [60.0, 125.0]])}
    out = lab.astype(np.uint32)
    res = drop_large(out, res, 0.4, block=64)
    assert res["n_objects"] == 1 and res["area"].tolist() == [100] and out.max() == 1 and out[25, 125] == 1


def test_exact_option_in_config():
    from pipeline_lib.config import cellpose_params, validate_config
    cfg = {"input": "x.zarr", "output": "y.zarr", "method": "cellpose_sam", "predictions": "p.zarr"}
    assert cellpose_params(validate_config(cfg)).exact is False
    cfg["cellpose"] = {"exact": True}
    assert cellpose_params(validate_config(cfg)).exact is True


def test_real_field_exact_blockwise_and_vs_cellpose(real_plate):
    """One real field's oracle flows (its ground truth through cellpose's masks_to_flows), with noise."""
    g = zarr.open_group(str(real_plate), mode="r")
    well = g.attrs["plate"]["wells"][0]["path"]
    image = g[well].attrs["well"]["images"][0]["path"]
    gt = np.asarray(g[f"{well}/{image}/labels/nuclei_gt/s0"])[0].astype(np.int64)
    gt = canonical(gt[:256, :384])
    flows = label_flows(gt) + np.random.default_rng(2).normal(0, 0.4, (3,) + gt.shape).astype(np.float32)
    full = cellpose_masks(flows, EXACT)
    out = np.zeros(gt.shape, np.uint32)
    info = masks_blockwise(flows, out, EXACT, block=128, halo=64)  # mask_halo default
    assert info["n_blocks"] == 6
    assert np.array_equal(canonical(out), canonical(full))
    ref = cellpose_masks(flows, FlowParams())
    msa = segmentation_scores(full, ref)["msa"]
    print(f"real field {well}/{image}: mSA exact vs cellpose {msa:.4f}, vs truth exact "
          f"{segmentation_scores(full, gt)['msa']:.4f}, cellpose {segmentation_scores(ref, gt)['msa']:.4f}")
    assert msa >= 0.995
