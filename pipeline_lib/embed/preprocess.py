"""Encoder input exactly as micro-sam builds it (``util._to_image`` + SAM's ResizeLongestSide + preprocess).

Per encoded array: channels to RGB, per-channel min-max to [0, 255] truncated to uint8, longest side
resized to 1024 (PIL bilinear with antialiasing, on uint8), SAM mean/std normalisation, zero padding
to 1024 x 1024. The optional ``value_range`` replaces the per-tile min/max with fixed bounds
(e.g. of the whole field), which avoids the contrast blow-up of empty tiles (micro-sam issue #1114).
Unlike micro-sam, NaN and inf pixels are left out of the min-max (they become 0); finite images are
encoded bit-exactly as micro-sam does.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide

ENCODER_SIZE = 1024
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

_RESIZE = ResizeLongestSide(ENCODER_SIZE)


def to_rgb_uint8(image: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """(H, W) or (H, W, C) -> (H, W, 3) uint8, with micro-sam's float32 arithmetic."""
    x = np.asarray(image)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=-1)
    elif x.ndim == 3 and x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    elif x.ndim == 3 and x.shape[-1] == 2:
        x = np.concatenate([x, np.zeros(x.shape[:2] + (1,), dtype=x.dtype)], axis=-1)
    elif x.ndim == 3 and x.shape[-1] > 3:
        x = x[..., :3]
    elif x.ndim != 3:
        raise ValueError(f"expected a 2D image (H, W) or (H, W, C), got shape {x.shape}")
    x = x.astype("float32")
    finite = np.isfinite(x)
    bad = None if finite.all() else ~finite
    if bad is not None:  # NaN / inf: left out of the min-max and encoded as 0 (micro-sam: one grey tile)
        x[bad] = np.nan
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN channels
        if value_range is None:
            lo = x.min(axis=(0, 1)) if bad is None else np.nanmin(x, axis=(0, 1))
            x -= lo[None, None]
            hi = x.max(axis=(0, 1)) if bad is None else np.nanmax(x, axis=(0, 1))
            x /= (hi[None, None] + 1e-7)
        else:
            lo, hi = (np.float32(v) for v in value_range)
            x = np.clip(x, lo, hi)
            x -= lo
            x /= (hi - lo + np.float32(1e-7))
    if bad is not None:
        x[np.isnan(x)] = 0
    return (x * 255).astype("uint8")


def resize_longest(image_uint8: np.ndarray) -> np.ndarray:
    """Resize so the longest side is 1024, as SAM's ``ResizeLongestSide.apply_image`` does."""
    return _RESIZE.apply_image(image_uint8)


def input_size(shape: tuple[int, int]) -> tuple[int, int]:
    """Size of the resized (unpadded) image inside the 1024 x 1024 encoder input."""
    return tuple(ResizeLongestSide.get_preprocess_shape(shape[0], shape[1], ENCODER_SIZE))


def normalize_and_pad(resized: list[np.ndarray], device: torch.device | str = "cpu") -> torch.Tensor:
    """Stack resized uint8 RGB images into a (B, 3, 1024, 1024) float32 batch on ``device``."""
    mean = torch.tensor(PIXEL_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=device).view(1, 3, 1, 1)
    batch = torch.zeros((len(resized), 3, ENCODER_SIZE, ENCODER_SIZE), dtype=torch.float32, device=device)
    for i, img in enumerate(resized):
        t = torch.as_tensor(img, device=device).permute(2, 0, 1).float()
        h, w = t.shape[-2:]
        batch[i, :, :h, :w] = (t - mean[0]) / std[0]
    return batch


def encoder_input(image: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """The resized uint8 RGB image for one tile (CPU part of the preprocessing)."""
    return resize_longest(to_rgb_uint8(image, value_range))
