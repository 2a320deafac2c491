"""Turn SAM's low-resolution mask logits into tile-resolution masks, only where a mask can be.

SAM upsamples each 256x256 logit map to 1024x1024, crops the resized-image region and resizes that to the
tile (``Sam.postprocess_masks``, bilinear both times). Both steps are linear and separable, so the
tile-resolution logits are ``Ry @ L @ Rx^T`` with two fixed matrices per tile shape. Bilinear weights are
convex, so a pixel can only exceed a threshold where one of its low-resolution sources does: each mask is
computed inside a window around its low-resolution support only, batched on the device, and leaves it as a
list of pixel indices (CSR), never as a full-size array.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .preprocess import input_size

LOW_RES = 256
ENCODER_SIZE = 1024
FILL_LOGIT = -1e4  # low-res logits outside a tile's extent (never read: their interpolation weights are 0)


def interp_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) matrix of PyTorch's linear interpolation (``align_corners=False``)."""
    eye = torch.eye(n_in, dtype=torch.float64).unsqueeze(0)  # 1 x C=n_in x L=n_in
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T.contiguous()


@lru_cache(maxsize=64)
def _axis(n_out: int, n_resized: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Composite matrix 256 -> n_out and its support: for each low-res index the first/last output index,
    for each output index the first/last low-res index with a non-zero weight."""
    r1 = interp_matrix(LOW_RES, ENCODER_SIZE)[:n_resized]
    r = interp_matrix(n_resized, n_out) @ r1  # n_out x 256
    nz = (r != 0).numpy()
    out_first = nz.argmax(0)
    out_last = n_out - 1 - nz[::-1].argmax(0)
    low_first = nz.argmax(1)
    low_last = LOW_RES - 1 - nz[:, ::-1].argmax(1)
    return r.float(), out_first, out_last, low_first, low_last


def low_res_extent(tile_shape: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of the low-res logits with a non-zero weight in a tile's postprocessing (the resized
    image's region plus the taps of its last row and column)."""
    ih, iw = input_size(tile_shape)
    return int(_axis(tile_shape[0], ih)[4][-1]) + 1, int(_axis(tile_shape[1], iw)[4][-1]) + 1


@dataclass
class MaskBatch:
    """Masks of one batch as CSR pixel lists in a field of width ``width`` (flat index ``y * width + x``)."""

    ptr: np.ndarray        # (B + 1,) int64
    pixels: np.ndarray     # (P,) int64 flat field indices, sorted within each mask
    area: np.ndarray       # (B,) int64, pixels with logit > threshold
    stability: np.ndarray  # (B,) float32, |logit > t + offset| / |logit > t - offset|
    bbox: np.ndarray       # (B, 4) int64 y0, x0, y1, x1 (exclusive) in field coordinates; 0s when empty


def upsample_masks(logits: torch.Tensor, tile_shape: tuple[int, int], origin: np.ndarray, width: int,
                   threshold: float = 0.0, offset: float = 1.0, on_device: bool = False) -> MaskBatch:
    """Masks ``logits > threshold`` at the tile's resolution for low-res ``logits`` (B, 256, 256).

    All masks belong to tiles of shape ``tile_shape``; ``origin`` (B, 2) is each mask's tile origin in the
    field. The stability score is SAM's (``calculate_stability_score``) on the same logits. With
    ``on_device`` the pixel lists stay on the logits' device (``pixels`` is then an int64 tensor there).
    """
    dev = logits.device
    b = logits.shape[0]
    h, w = tile_shape
    ih, iw = input_size(tile_shape)
    ry, ry_first, ry_last, ly_first, ly_last = _axis(h, ih)
    rx, rx_first, rx_last, lx_first, lx_last = _axis(w, iw)
    lo_t = threshold - offset
    support = logits > lo_t
    rows_any = support.any(2).cpu().numpy()
    cols_any = support.any(1).cpu().numpy()
    alive = rows_any.any(1)
    no_pixels = torch.zeros(0, dtype=torch.int64, device=dev) if on_device else np.zeros(0, np.int64)
    empty = MaskBatch(np.zeros(b + 1, np.int64), no_pixels, np.zeros(b, np.int64),
                      np.zeros(b, np.float32), np.zeros((b, 4), np.int64))
    if not alive.any():
        return empty
    ly0 = rows_any.argmax(1)
    ly1 = LOW_RES - 1 - rows_any[:, ::-1].argmax(1)
    lx0 = cols_any.argmax(1)
    lx1 = LOW_RES - 1 - cols_any[:, ::-1].argmax(1)
    # output windows [y0, y1] and the low-res rows/cols feeding them
    y0, y1 = ry_first[ly0], ry_last[ly1]
    x0, x1 = rx_first[lx0], rx_last[lx1]
    wh, ww = int((y1 - y0)[alive].max()) + 1, int((x1 - x0)[alive].max()) + 1
    # every output row/col of a window (which is as large as the batch's largest) needs all its low-res
    # sources: a window that ended at the mask's own last row would truncate the taps of the rows after it
    sy0, sy1 = ly_first[y0], ly_last[np.minimum(y0 + wh - 1, h - 1)]
    sx0, sx1 = lx_first[x0], lx_last[np.minimum(x0 + ww - 1, w - 1)]
    lh, lw = int((sy1 - sy0)[alive].max()) + 1, int((sx1 - sx0)[alive].max()) + 1

    def gather(mat, o0, l0, n_o, n_l, n_out):
        pad = torch.zeros((n_out + n_o, LOW_RES + n_l), device=dev)
        pad[:n_out, :LOW_RES] = mat.to(dev)
        oi = torch.as_tensor(o0, device=dev)[:, None] + torch.arange(n_o, device=dev)
        li = torch.as_tensor(l0, device=dev)[:, None] + torch.arange(n_l, device=dev)
        return pad[oi[:, :, None], li[:, None, :]], oi < n_out  # B x n_o x n_l, valid outputs

    gy, vy = gather(ry, y0, sy0, wh, lh, h)
    gx, vx = gather(rx, x0, sx0, ww, lw, w)
    lpad = F.pad(logits.float(), (0, lw, 0, lh), value=0.0)
    iy = torch.as_tensor(sy0, device=dev)[:, None] + torch.arange(lh, device=dev)
    ix = torch.as_tensor(sx0, device=dev)[:, None] + torch.arange(lw, device=dev)
    lc = lpad[torch.arange(b, device=dev)[:, None, None], iy[:, :, None], ix[:, None, :]]
    full = torch.bmm(torch.bmm(gy, lc), gx.transpose(1, 2))  # B x wh x ww
    valid = vy[:, :, None] & vx[:, None, :]
    full.masked_fill_(~valid, float("-inf"))
    mask = full > threshold
    hi = _count(full > threshold + offset)
    lo = _count(full > lo_t)
    area = _count(mask)
    stability = torch.where(lo > 0, hi.float() / lo.clamp(min=1).float(), torch.zeros_like(hi, dtype=torch.float32))
    area_np = area.cpu().numpy().astype(np.int64)
    ptr = np.zeros(b + 1, np.int64)
    np.cumsum(area_np, out=ptr[1:])
    oy = y0 + origin[:, 0]  # each window's first pixel in the field
    ox = x0 + origin[:, 1]
    # flat field index of the true pixels: with f = (mask k, row y, col x) in C order and q = f // ww =
    # k * wh + y, the pixel (oy + y) * width + ox + x is f + q * (width - ww) + (oy * width + ox - k * wh * width)
    shift = oy * width + ox - np.arange(b, dtype=np.int64) * (wh * width)
    if on_device:
        f = torch.nonzero(mask.reshape(-1)).flatten()
        pixels = f + (f // ww) * (width - ww)
        pixels += torch.repeat_interleave(torch.as_tensor(shift, device=dev), torch.as_tensor(area_np, device=dev))
    else:
        f = _flat_true(mask)
        pixels = f + (f // ww) * (width - ww)
        pixels += np.repeat(shift, area_np)
    bbox = np.zeros((b, 4), np.int64)
    has = area_np > 0
    if has.any():  # first/last row and column with a true pixel, from the masks' row and column projections
        rows, cols = mask.any(2).cpu().numpy()[has], mask.any(1).cpu().numpy()[has]
        bbox[has, 0] = oy[has] + rows.argmax(1)
        bbox[has, 2] = oy[has] + wh - rows[:, ::-1].argmax(1)
        bbox[has, 1] = ox[has] + cols.argmax(1)
        bbox[has, 3] = ox[has] + ww - cols[:, ::-1].argmax(1)
    return MaskBatch(ptr, pixels, area_np, stability.cpu().numpy().astype(np.float32), bbox)


def _count(m: torch.Tensor) -> torch.Tensor:
    """True pixels per mask of a (B, h, w) bool tensor: row sums in int16 (exact for w < 32768) then
    columns, several times faster than ``sum``, which first copies the booleans to int64."""
    rows = m.view(torch.uint8).sum(2, dtype=torch.int16 if m.shape[2] < 2**15 else torch.int32)
    return rows.sum(1)


def _flat_true(m: torch.Tensor) -> np.ndarray:
    """C-order flat indices (int64, numpy) of the true entries of a bool tensor (numpy's ``flatnonzero`` on
    the CPU, much faster than ``torch.nonzero``)."""
    if m.device.type != "cpu":
        return torch.nonzero(m.reshape(-1)).flatten().cpu().numpy()
    return np.flatnonzero(m.numpy())


def reference_masks(logits: torch.Tensor, tile_shape: tuple[int, int], threshold: float = 0.0,
                    offset: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's full-size path (``Sam.postprocess_masks`` + stability score), for tests: (masks, stability)."""
    ih, iw = input_size(tile_shape)
    x = F.interpolate(logits[:, None].float(), (ENCODER_SIZE, ENCODER_SIZE), mode="bilinear", align_corners=False)
    x = F.interpolate(x[..., :ih, :iw], tile_shape, mode="bilinear", align_corners=False)[:, 0]
    inter = (x > threshold + offset).sum((1, 2)).float()
    union = (x > threshold - offset).sum((1, 2)).float()
    return x > threshold, inter / union
