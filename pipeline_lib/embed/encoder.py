"""SAM's ViT image encoder restructured around ``scaled_dot_product_attention`` (same weights, same outputs).

segment_anything's ``Attention`` forms the full attention matrix ``(q * scale) @ k^T``, adds the decomposed
relative-position terms (MViTv2: ``rel_h[q, kh] + rel_w[q, kw]``) and applies ``softmax`` and ``@ v`` as
separate ops, so every block writes and re-reads two N x N matrices per head. Here the decomposed terms are
formed as one additive bias and passed to ``F.scaled_dot_product_attention`` as ``attn_mask``: PyTorch
fuses scale, bias, softmax and the value product in one kernel (memory-efficient attention on CUDA, the
flash kernel on CPU). The windows of all images of a batch are attended in one call (B * 25 windows of
14 x 14 for a 1024 input); a call is split into chunks (of images, then of query rows of the token grid)
where its bias would exceed ``ATTN_BIAS_ELEMENTS``, so the transient memory of attention (bias and, on
the CPU, the score matrix) is bounded per call, not per batch: a global block of a 1024 input has
heads x 4096 x 4096 scores per image (ViT-B: 800 MB in fp32), and at batch 8 the unchunked call held 2-3 GB
on the CPU. Rows of the query are independent, so chunking changes no arithmetic. The arithmetic is the
published one (same padding of the 64 x 64 grid to 70 x 70,
padded tokens attended as in SAM), so outputs equal segment_anything's up to float rounding (tests/
test_encoder.py, ViT-B/L/H shapes, fp32 and bf16).

``accelerate_encoder`` adopts the submodules of a built ``ImageEncoderViT`` (no copy, no re-init), so the
state-dict names are unchanged and published checkpoints and the tiny test model load as before.
Differences from segment-anything-fast (the anchor): no custom Triton kernel and no folding of the bias
into q/k; ``torch.compile`` is optional (``encoder.compile``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ATTN_BIAS_ELEMENTS = 2**24  # at most this many bias elements (64 MB in fp32) per attention call


def _rel_tables(attn: nn.Module, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    from segment_anything.modeling.image_encoder import get_rel_pos
    return get_rel_pos(size[0], size[0], attn.rel_pos_h), get_rel_pos(size[1], size[1], attn.rel_pos_w)


class SdpaAttention(nn.Module):
    """segment_anything's ``Attention`` (same ``qkv``, ``proj``, ``rel_pos_h``, ``rel_pos_w``) on SDPA."""

    def __init__(self, stock: nn.Module):
        super().__init__()
        self.num_heads = stock.num_heads
        self.qkv = stock.qkv
        self.proj = stock.proj
        self.use_rel_pos = stock.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h = stock.rel_pos_h
            self.rel_pos_w = stock.rel_pos_w

    def _bias(self, q: torch.Tensor, size: tuple[int, int], rows: slice | None = None) -> torch.Tensor:
        """(B, heads, n_q, N) additive bias: SAM's ``add_decomposed_rel_pos`` terms (from the unscaled q) for
        the queries of grid rows ``rows`` (all rows if None; ``q`` holds just those queries)."""
        b, heads, nq, d = q.shape
        rh, rw = _rel_tables(self, size)
        rows = rows or slice(0, size[0])
        r_q = q.reshape(b, heads, rows.stop - rows.start, size[1], d)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh[rows].to(q.dtype))
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw.to(q.dtype))
        return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, heads, nq, size[0] * size[1])

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if not self.use_rel_pos:
            return F.scaled_dot_product_attention(q, k, v)
        b, heads, n, _ = q.shape
        step = max(1, ATTN_BIAS_ELEMENTS // (b * heads * n * size[1]))  # grid rows of queries per call
        if step >= size[0]:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self._bias(q, size))
        parts = []
        for r0 in range(0, size[0], step):
            rows = slice(r0, min(r0 + step, size[0]))
            qs = q[:, :, rows.start * size[1]:rows.stop * size[1]]
            parts.append(F.scaled_dot_product_attention(qs, k, v, attn_mask=self._bias(qs, size, rows)))
        return torch.cat(parts, dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        n = h * w
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, d)
        chunk = b
        if self.use_rel_pos:
            chunk = max(1, min(b, ATTN_BIAS_ELEMENTS // (self.num_heads * n * n)))
        out = torch.cat([self._attend(q[i:i + chunk], k[i:i + chunk], v[i:i + chunk], (h, w))
                         for i in range(0, b, chunk)]) if chunk < b else self._attend(q, k, v, (h, w))
        x = out.permute(0, 2, 1, 3).reshape(b, h, w, -1)
        return self.proj(x)


class SdpaBlock(nn.Module):
    """segment_anything's ``Block`` (same ``norm1``, ``attn``, ``norm2``, ``mlp``) with ``SdpaAttention``."""

    def __init__(self, stock: nn.Module):
        super().__init__()
        self.norm1 = stock.norm1
        self.attn = SdpaAttention(stock.attn)
        self.norm2 = stock.norm2
        self.mlp = stock.mlp
        self.window_size = stock.window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from segment_anything.modeling.image_encoder import window_partition, window_unpartition
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            hw = (x.shape[1], x.shape[2])
            x, pad_hw = window_partition(x, self.window_size)  # all windows of all images: one batch
            x = window_unpartition(self.attn(x), self.window_size, pad_hw, hw)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class SdpaImageEncoderViT(nn.Module):
    """segment_anything's ``ImageEncoderViT`` with the same submodule and parameter names, on SDPA."""

    def __init__(self, stock: nn.Module):
        super().__init__()
        self.img_size = stock.img_size
        self.patch_embed = stock.patch_embed
        self.pos_embed = stock.pos_embed
        self.blocks = nn.ModuleList(SdpaBlock(b) for b in stock.blocks)
        self.neck = stock.neck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))


def accelerate_encoder(stock: nn.Module) -> nn.Module:
    """The SDPA encoder adopting ``stock``'s parameters (shared, not copied); other encoders (e.g.
    MobileSAM's TinyViT) are returned unchanged."""
    from segment_anything.modeling.image_encoder import ImageEncoderViT
    if isinstance(stock, SdpaImageEncoderViT) or not isinstance(stock, ImageEncoderViT):
        return stock
    return SdpaImageEncoderViT(stock).train(stock.training)


def compile_encoder(encoder: nn.Module) -> nn.Module:
    """``torch.compile`` the encoder in place (``nn.Module.compile``: parameter names stay as they are)."""
    encoder.compile()
    return encoder
