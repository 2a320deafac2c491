"""The batched prompt decoder and the windowed mask upsampling equal SAM's own modules."""
import numpy as np
import pytest
import torch

from pipeline_lib.embed.mask_upsample import interp_matrix, reference_masks, upsample_masks
from pipeline_lib.embed.prompt_decoder import PromptDecoder, reference_decode
from pipeline_lib.models.tiny import build_tiny


@pytest.mark.parametrize("multimask", [False, True])
def test_batched_decoder_equals_sam_mask_decoder(multimask):
    sam, _ = build_tiny(3)
    torch.manual_seed(0)
    emb = torch.randn(3, 256, 64, 64)
    tile = torch.tensor([2, 0, 0, 1, 2, 2, 1, 0, 2])
    coords = torch.rand(len(tile), 1, 2) * 1023
    labels = torch.ones(len(tile), 1)
    pd = PromptDecoder(sam)
    pd.set_tiles(emb)
    masks, iou = pd.decode(tile, coords, labels, multimask=multimask)
    assert masks.shape == (len(tile), 3 if multimask else 1, 256, 256)
    for t in range(3):
        sel = tile == t
        ref_m, ref_iou = reference_decode(sam, emb[t:t + 1], coords[sel], labels[sel], multimask=multimask)
        scale = ref_m.abs().max()
        assert torch.allclose(masks[sel], ref_m, atol=1e-5 * scale), (masks[sel] - ref_m).abs().max()
        assert torch.allclose(iou[sel], ref_iou, atol=1e-5)


def test_interp_matrix_is_torch_bilinear():
    x = torch.randn(1, 1, 40, 256, dtype=torch.float64)
    ref = torch.nn.functional.interpolate(x, (40, 1000), mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(x[0, 0] @ interp_matrix(256, 1000).T, ref, atol=1e-12)


@pytest.mark.parametrize("shape", [(520, 696), (640, 640), (100, 37), (576, 512)])
def test_windowed_masks_equal_full_size_postprocessing(shape):
    torch.manual_seed(1)
    yy, xx = torch.meshgrid(torch.arange(256.), torch.arange(256.), indexing="ij")
    c, r = torch.rand(12, 2) * 256, torch.rand(12) * 40 + 2
    logits = (r[:, None, None] - ((yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2).sqrt()) / 3
    logits += 0.3 * torch.randn(12, 256, 256)
    logits[3] = -5.0  # empty
    logits[4] = 2.0   # everything
    origin = np.tile([[7, 11]], (12, 1))
    width = 1000
    mb = upsample_masks(logits, shape, origin, width)
    ref, stab = reference_masks(logits, shape)
    n_diff = 0
    for i in range(12):
        ys, xs = np.nonzero(ref[i].numpy())
        want = (ys + 7) * width + xs + 11
        got = mb.pixels[mb.ptr[i]:mb.ptr[i + 1]]
        n_diff += len(np.setxor1d(want, got))
        if len(ys):
            assert tuple(mb.bbox[i]) == (ys.min() + 7, xs.min() + 11, ys.max() + 8, xs.max() + 12)
    assert n_diff <= 2  # float rounding at logit == 0 only
    assert np.allclose(np.nan_to_num(stab.numpy()), mb.stability, atol=1e-3)
    assert mb.area[3] == 0 and mb.area[4] == shape[0] * shape[1]


def test_stability_of_small_masks_batched_with_large_ones():
    """A small mask shares the batch's (larger) window: rows past its own support must still see all their
    low-res sources, or its stability score counts spurious pixels above ``threshold - offset``."""
    torch.manual_seed(2)
    yy, xx = torch.meshgrid(torch.arange(256.), torch.arange(256.), indexing="ij")
    c, r = torch.rand(16, 2) * 256, torch.rand(16) * 120 + 2
    logits = 10 * (r[:, None, None] - ((yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2).sqrt()) / 3
    logits += 3 * torch.randn(16, 256, 256)
    shape = (520, 696)
    mb = upsample_masks(logits, shape, np.zeros((16, 2), np.int64), shape[1])
    ref, stab = reference_masks(logits, shape)
    assert np.allclose(np.nan_to_num(stab.numpy()), mb.stability, atol=1e-6)
    assert np.array_equal(mb.area, ref.sum((1, 2)).numpy())


@pytest.mark.parametrize("shape", [(520, 696), (100, 37)])
def test_decode_extent_gives_the_same_tile_masks(shape):
    """Upscaling only the tokens under a tile's low-res extent leaves its masks unchanged."""
    from pipeline_lib.embed.mask_upsample import low_res_extent
    sam, _ = build_tiny(3)
    torch.manual_seed(4)
    pd = PromptDecoder(sam)
    pd.set_tiles(torch.randn(1, 256, 64, 64))
    tile = torch.zeros(6, dtype=torch.long)
    coords = torch.rand(6, 1, 2) * torch.tensor([shape[1], shape[0]]) * 1024 / max(shape)
    full, iou = pd.decode(tile, coords)
    rows, cols = low_res_extent(shape)
    part, iou2 = pd.decode(tile, coords, extent=(rows, cols))
    assert torch.equal(part[..., :rows, :cols], full[..., :rows, :cols]) and torch.equal(iou, iou2)
    origin = np.zeros((6, 2), np.int64)
    a, b = (upsample_masks(x[:, 0], shape, origin, shape[1]) for x in (full, part))
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("ptr", "pixels", "area", "stability", "bbox"))
