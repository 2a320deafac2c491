"""Encoder input must match micro-sam + segment_anything bit for bit."""
import numpy as np
import pytest
import torch
from segment_anything.predictor import SamPredictor

from pipeline_lib.embed.preprocess import encoder_input, normalize_and_pad, to_rgb_uint8
from pipeline_lib.models.tiny import build_tiny


def micro_sam_to_image(x):
    """micro_sam.util._to_image (1.8.14), verbatim logic."""
    if x.ndim == 2:
        x = np.concatenate([x[..., None]] * 3, axis=-1)
    elif x.shape[-1] == 2:
        x = np.concatenate([x, np.zeros(x.shape[:2] + (1,), dtype=x.dtype)], axis=-1)
    elif x.shape[-1] > 3:
        x = x[..., :3]
    x = x.astype("float32")
    x -= x.min(axis=(0, 1))[None, None]
    x /= (x.max(axis=(0, 1))[None, None] + 1e-7)
    return (x * 255).astype("uint8")


@pytest.fixture(scope="module")
def predictor():
    sam, _ = build_tiny()
    return SamPredictor(sam)


@pytest.mark.parametrize("shape,dtype", [((37, 91), np.uint16), ((513, 257), np.float32), ((100, 1001), np.uint8),
                                         ((64, 63, 2), np.uint16), ((45, 77, 3), np.float64),
                                         ((33, 29, 5), np.int32)])
def test_bit_exact_against_segment_anything(predictor, shape, dtype):
    rng = np.random.default_rng(sum(shape))
    img = (rng.random(shape) * 5000 - (1000 if dtype in (np.float32, np.float64, np.int32) else 0)).astype(dtype)
    ref_rgb = micro_sam_to_image(img)
    ours_rgb = to_rgb_uint8(img)
    assert np.array_equal(ref_rgb, ours_rgb)
    # segment_anything's own path: ResizeLongestSide.apply_image -> tensor -> Sam.preprocess
    t = predictor.transform.apply_image(ref_rgb)
    t = torch.as_tensor(t).permute(2, 0, 1).contiguous()[None]
    ref = predictor.model.preprocess(t)
    ours = normalize_and_pad([encoder_input(img)])
    assert ref.shape == ours.shape == (1, 3, 1024, 1024)
    assert torch.equal(ref, ours)


def test_constant_tile_is_zero():
    rgb = to_rgb_uint8(np.full((20, 30), 7, np.uint16))
    assert rgb.max() == 0


def test_field_value_range_differs_from_tile_normalisation():
    img = np.zeros((50, 50), np.uint16)
    img[10, 10] = 10
    assert to_rgb_uint8(img)[10, 10, 0] == 254 or to_rgb_uint8(img)[10, 10, 0] == 255
    assert to_rgb_uint8(img, value_range=(0, 1000))[10, 10, 0] == 2
