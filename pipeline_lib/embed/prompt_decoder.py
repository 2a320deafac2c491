"""SAM's prompt encoder + mask decoder for point prompts, batched across tiles and restructured for speed.

The hot spot of APG/AMG is decoding thousands of prompts. SAM's ``MaskDecoder`` repeats each image
embedding per prompt and projects all 4096 image tokens in every attention layer. Two exact rewrites
remove most of that work (same outputs up to float rounding, checked in the tests against SAM's module):

* in the first layer the image tokens do not yet depend on the prompt, so the token->image key/value
  projections are computed once per tile, not once per prompt;
* elsewhere, attention between the few prompt tokens (7) and the 4096 image tokens is computed with the
  projections folded into the small side (``q (X Wk)^T = (q Wk) X^T``, ``A (X Wv) = (A X) Wv`` and the
  mirror image for image->token attention), which needs about 2.3x fewer multiply-adds.

Prompts of many tiles go into one batch: each prompt carries the index of its tile's embedding.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..instances.nms import Candidates, csr_take
from . import device_masks as dm
from .device_masks import DeviceCandidates
from ..tiling import Block
from .mask_upsample import FILL_LOGIT, MaskBatch, low_res_extent, upsample_masks
from .preprocess import input_size


def _heads_weight(lin: torch.nn.Linear, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, d, C) weight and (H, d) bias of a projection C -> H*d."""
    w = lin.weight
    return w.reshape(heads, w.shape[0] // heads, w.shape[1]), lin.bias.reshape(heads, -1)


def _tokens_to_image(att, q_in: torch.Tensor, x_k: torch.Tensor, x_v: torch.Tensor) -> torch.Tensor:
    """Attention with queries = B x T prompt tokens and keys/values = B x N image tokens (C channels).

    Projections are folded into the token side, so no B x N x (H*d) tensor is ever formed.
    """
    heads = att.num_heads
    b, t, _ = q_in.shape
    q = att.q_proj(q_in).reshape(b, t, heads, -1).transpose(1, 2)  # B H T d
    d = q.shape[-1]
    wk, _ = _heads_weight(att.k_proj, heads)  # H d C   (k bias adds a per-row constant: softmax-invariant)
    wv, bv = _heads_weight(att.v_proj, heads)
    qk = torch.einsum("bhtd,hdc->bhtc", q / math.sqrt(d), wk).reshape(b, heads * t, -1)  # B (H T) C
    scores = torch.bmm(qk, x_k.transpose(1, 2))  # B (H T) N
    a = torch.softmax(scores, dim=-1)
    ax = torch.bmm(a, x_v).reshape(b, heads, t, -1)  # B H T C
    out = torch.einsum("bhtc,hdc->bhtd", ax, wv) + bv[None, :, None, :]
    out = out.transpose(1, 2).reshape(b, t, heads * d)
    return att.out_proj(out)


def _tokens_to_image_shared(att, q_in: torch.Tensor, k_heads: torch.Tensor, v_heads: torch.Tensor,
                            groups: list[tuple[int, torch.Tensor | None]]) -> torch.Tensor:
    """Token->image attention when the projected image keys/values (tiles x H x N x d) are per tile.

    One matmul per tile for all its prompts (their tokens stacked), never a per-prompt copy of the keys."""
    heads = att.num_heads
    b, t, _ = q_in.shape
    q = att.q_proj(q_in).reshape(b, t, heads, -1)  # B T H d
    d = q.shape[-1]
    out = torch.empty_like(q)
    for ti, sel in groups:
        qs = q if sel is None else q[sel]
        n = qs.shape[0]
        qh = qs.permute(2, 0, 1, 3).reshape(heads, n * t, d) / math.sqrt(d)  # H (n T) d
        a = torch.softmax(torch.bmm(qh, k_heads[ti].transpose(1, 2)), dim=-1)  # H (n T) N
        o = torch.bmm(a, v_heads[ti]).reshape(heads, n, t, d).permute(1, 2, 0, 3)  # n T H d
        if sel is None:
            out = o
        else:
            out[sel] = o
    return att.out_proj(out.reshape(b, t, heads * d))


def _image_to_tokens_parts(att, k_in: torch.Tensor, v_in: torch.Tensor):
    """The prompt-side factors of image->token attention: (B, H*T, C) query map, (B, H*T, 1) bias and
    (B, H*T, C) values already multiplied by the output projection, its bias folded in (each head's
    attention weights over the T tokens sum to 1, so adding bias / H to every row adds the bias once)."""
    heads = att.num_heads
    b, t, _ = k_in.shape
    k = att.k_proj(k_in).reshape(b, t, heads, -1).transpose(1, 2)  # B H T d
    v = att.v_proj(v_in).reshape(b, t, heads, -1).transpose(1, 2)
    d = k.shape[-1]
    k = k / math.sqrt(d)
    wq, bq = _heads_weight(att.q_proj, heads)  # H d C
    m = torch.einsum("hdc,bhtd->bhtc", wq, k).reshape(b, heads * t, -1)  # B (H T) C
    bias = torch.einsum("hd,bhtd->bht", bq, k).reshape(b, heads * t, 1)
    wo = att.out_proj.weight.reshape(att.out_proj.weight.shape[0], heads, d)  # C H d
    vw = torch.einsum("bhtd,chd->bhtc", v, wo) + att.out_proj.bias / heads
    return m, bias, vw.reshape(b, heads * t, -1), heads, t  # vw: B (H T) C


def _softmax_over_tokens(scores: torch.Tensor, heads: int, t: int) -> torch.Tensor:
    """Softmax of (B, H*T, N) image->token scores over the T prompt tokens of each head: the reduced axis is
    not the contiguous one, so the kernel runs along the N image tokens instead of rows of length T."""
    b, _, n = scores.shape
    return torch.softmax(scores.reshape(b, heads, t, n), dim=2).reshape(b, heads * t, n)


def _image_to_tokens_per_tile(att, x_tiles: torch.Tensor, residual: torch.Tensor,
                              groups: list[tuple[int, torch.Tensor | None]], k_in: torch.Tensor,
                              v_in: torch.Tensor) -> torch.Tensor:
    """``residual[tile] + attention`` for image->token attention whose image-side queries (tiles x N x C)
    are shared per tile: one matmul per tile for all its prompts, no per-prompt copy of the image tokens."""
    m, bias, vw, heads, t = _image_to_tokens_parts(att, k_in, v_in)
    b = m.shape[0]
    out = torch.empty((b, x_tiles.shape[1], vw.shape[-1]), device=m.device, dtype=m.dtype)
    for ti, sel in groups:
        ms, bs, vs = (m, bias, vw) if sel is None else (m[sel], bias[sel], vw[sel])
        n = ms.shape[0]
        sc = torch.matmul(ms.reshape(n * heads * t, -1), x_tiles[ti].T).reshape(n, heads * t, -1) + bs
        a = _softmax_over_tokens(sc, heads, t)
        o = torch.baddbmm(residual[ti].expand(n, -1, -1), a.transpose(1, 2), vs)
        if sel is None:
            out = o
        else:
            out[sel] = o
    return out


def _image_to_tokens(att, residual: torch.Tensor, x_q: torch.Tensor, k_in: torch.Tensor,
                     v_in: torch.Tensor) -> torch.Tensor:
    """``residual`` + attention with queries = B x N image tokens and keys/values = B x T prompt tokens."""
    m, bias, vw, heads, t = _image_to_tokens_parts(att, k_in, v_in)
    a = _softmax_over_tokens(torch.baddbmm(bias, m, x_q.transpose(1, 2)), heads, t)  # B (H T) N
    return torch.baddbmm(residual, a.transpose(1, 2), vw)


def _upscale_weights(up: torch.nn.Sequential) -> tuple[torch.Tensor, ...]:
    """SAM's ``output_upscaling`` (2x2 stride-2 transposed conv, LayerNorm2d, GELU, 2x2 stride-2 transposed
    conv, GELU) as per-pixel matrices: a 2x2 stride-2 transposed conv maps each input pixel to its own
    2x2 output patch, i.e. it is one matmul (C_in -> 4 C_out) per pixel."""
    w1, b1 = up[0].weight, up[0].bias  # C_in C_out 2 2
    w2, b2 = up[3].weight, up[3].bias
    w1r = w1.permute(0, 2, 3, 1).reshape(w1.shape[0], -1)  # C_in (i j C_out)
    w2r = w2.permute(0, 2, 3, 1).reshape(w2.shape[0], -1)
    return w1r, b1.repeat(4), w2r, b2.repeat(4)


def _upscaled_masks(up: torch.nn.Sequential, keys: torch.Tensor, hyper: torch.Tensor, hw: tuple[int, int],
                    extent: tuple[int, int] | None = None, chunk: int = 4) -> torch.Tensor:
    """Mask logits (B, M, 4h, 4w) = hypernetwork outputs (B, M, c) . upscaled image tokens (B, h*w, C).

    The same arithmetic as ``hyper @ output_upscaling(keys)`` kept channels-last throughout (no transposed
    convolution, no layout copies), in chunks of prompts so the largest intermediate stays small. With
    ``extent`` (rows, cols of logits) only the tokens covering it are upscaled; the rest is ``FILL_LOGIT``."""
    w1r, b1, w2r, b2 = _upscale_weights(up)
    ln = up[1]
    c1, c2 = up[0].weight.shape[1], up[3].weight.shape[1]
    b = keys.shape[0]
    h, w = hw
    th, tw = (h, w) if extent is None else (min(h, -(-extent[0] // 4)), min(w, -(-extent[1] // 4)))
    m = hyper.shape[1]
    shape = (b, m, h, 2, 2, w, 2, 2)
    out = (torch.empty(shape, device=keys.device, dtype=keys.dtype) if (th, tw) == (h, w) else
           torch.full(shape, FILL_LOGIT, device=keys.device, dtype=keys.dtype))
    grid = keys.reshape(b, h, w, -1)[:, :th, :tw]
    for s in range(0, b, chunk):
        k = grid[s:s + chunk]
        z = torch.addmm(b1, k.reshape(-1, k.shape[-1]), w1r).reshape(-1, c1)  # (b n i j) C1
        z = F.gelu(F.layer_norm(z, (c1,), ln.weight, ln.bias, ln.eps))
        z = F.gelu(torch.addmm(b2, z, w2r))  # (b n i j) (k l C2)
        z = torch.bmm(z.reshape(len(k), -1, c2), hyper[s:s + chunk].transpose(1, 2))  # b (n i j k l) M
        # (y x i j k l) -> pixel (4y + 2i + k, 4x + 2j + l)
        out[s:s + chunk, :, :th, :, :, :tw] = z.reshape(len(k), th, tw, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)
    return out.reshape(b, m, 4 * h, 4 * w)


TILE_CACHE = 4  # tiles whose layer-1 terms a PromptDecoder keeps (see set_tiles)


class PromptDecoder:
    """Decode point prompts against a set of tile embeddings (``set_tiles`` first, then ``decode``)."""

    def __init__(self, sam: torch.nn.Module):
        self.sam = sam
        self.pe = sam.prompt_encoder
        self.md = sam.mask_decoder
        self.tr = self.md.transformer
        self.device = next(sam.parameters()).device
        self._tiles = None

    @torch.no_grad()
    def set_tiles(self, embeddings: torch.Tensor) -> None:
        """Tile embeddings (T, C, h, w) from the image encoder.

        The per-tile work of layer 1 (image tokens with the dense prompt and positional terms, and their
        key/value projections: four more tensors of the embedding's size per tile) is done lazily for the
        tiles of each batch and kept for the last ``TILE_CACHE`` tiles only, so a block of many tiles holds
        its embeddings once (4 MB per tile), not five times. ``decode_points`` sorts prompts by tile, so
        each tile's terms are computed about once."""
        self._emb = embeddings.to(self.device, torch.float32)
        self._pe = self.pe.get_dense_pe().flatten(2).transpose(1, 2)  # 1 N C
        self._hw = tuple(self._emb.shape[-2:])
        self._cache: dict[int, tuple[torch.Tensor, ...]] = {}
        self._tiles = True

    def _tile_terms(self, ti: int) -> tuple[torch.Tensor, ...]:
        """(src, src_pe, k1, v1) of tile ``ti``: its tokens (N C) and layer-1 keys/values (H N d)."""
        if ti in self._cache:
            return self._cache[ti]
        h, w = self._hw
        dense = self.pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        src = (self._emb[ti:ti + 1] + dense).flatten(2).transpose(1, 2)  # 1 N C
        att = self.tr.layers[0].cross_attn_token_to_image
        heads = att.num_heads
        src_pe = src + self._pe
        k = att.k_proj(src_pe).reshape(1, h * w, heads, -1).transpose(1, 2).contiguous()
        v = att.v_proj(src).reshape(1, h * w, heads, -1).transpose(1, 2).contiguous()
        if len(self._cache) >= TILE_CACHE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[ti] = (src[0], src_pe[0], k[0], v[0])
        return self._cache[ti]

    def _batch_tiles(self, tile: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """The layer-1 terms of the tiles used by a batch, stacked, and the prompts' indices into them."""
        used, local = torch.unique(tile, return_inverse=True)
        terms = [self._tile_terms(int(ti)) for ti in used.tolist()]
        st = {name: torch.stack([t[i] for t in terms]) for i, name in enumerate(("src", "src_pe", "k1", "v1"))}
        return {**st, "pe": self._pe, "hw": self._hw}, local

    def _sparse(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.pe._embed_points(coords, labels, pad=True)

    @torch.no_grad()
    def decode(self, tile: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor | None = None,
               multimask: bool = False, extent: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution mask logits (B, M, 256, 256) and predicted IoUs (B, M) for point prompts.

        ``tile``: (B,) index into the tile embeddings; ``coords``: (B, P, 2) x/y in encoder-input (1024)
        coordinates, as SAM's ``ResizeLongestSide.apply_coords`` gives them; ``labels``: (B, P), 1 = positive.
        ``M`` is 1, or 3 with ``multimask`` (SAM's convention). ``extent`` (rows, cols): only the low-res
        logits SAM's postprocessing reads for the tile (``mask_upsample.low_res_extent``) are computed, the
        others are ``FILL_LOGIT`` (each 4x4 block of logits depends only on its own image token).
        """
        if self._tiles is None:
            raise RuntimeError("call set_tiles() before decode()")
        st, tile = self._batch_tiles(tile.to(self.device, torch.long))
        coords = coords.to(self.device, torch.float32)
        if labels is None:
            labels = torch.ones(coords.shape[:2], device=self.device)
        labels = labels.to(self.device, torch.float32)
        groups = _tile_groups(tile)
        md, tr = self.md, self.tr
        sparse = self._sparse(coords, labels)
        out_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse], dim=1)
        query_pe = tokens
        pe = st["pe"]
        queries = tokens
        keys = None
        for layer in tr.layers:
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + query_pe
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            if keys is None:  # first layer: image tokens are still per tile
                attn = _tokens_to_image_shared(layer.cross_attn_token_to_image, queries + query_pe,
                                               st["k1"], st["v1"], groups)
            else:
                keys_pe = keys + pe
                attn = _tokens_to_image(layer.cross_attn_token_to_image, queries + query_pe, keys_pe, keys)
            queries = layer.norm2(queries + attn)
            queries = layer.norm3(queries + layer.mlp(queries))
            if keys is None:
                keys = layer.norm4(_image_to_tokens_per_tile(layer.cross_attn_image_to_token, st["src_pe"],
                                                             st["src"], groups, queries + query_pe, queries))
            else:
                keys = layer.norm4(_image_to_tokens(layer.cross_attn_image_to_token, keys, keys_pe,
                                                    queries + query_pe, queries))
        # the final attention only for the tokens read out: the IoU token and the mask tokens used
        first, n_masks = (1, md.num_mask_tokens - 1) if multimask else (0, 1)
        rows = [0] + list(range(1 + first, 1 + first + n_masks))
        queries, query_pe = queries[:, rows], query_pe[:, rows]
        attn = _tokens_to_image(tr.final_attn_token_to_image, queries + query_pe, keys + pe, keys)
        queries = tr.norm_final_attn(queries + attn)

        hyper = torch.stack([md.output_hypernetworks_mlps[first + j](queries[:, 1 + j, :]) for j in range(n_masks)],
                            dim=1)
        masks = _upscaled_masks(md.output_upscaling, keys, hyper, st["hw"], extent)
        iou = md.iou_prediction_head(queries[:, 0, :])[:, first:first + n_masks]
        return masks, iou


def _tile_groups(tile: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """(tile index, indices of its prompts) per tile of a batch; None when all prompts share one tile."""
    ids = torch.unique(tile).tolist()
    if len(ids) == 1:
        return [(ids[0], None)]
    return [(ti, torch.nonzero(tile == ti).flatten()) for ti in ids]


@torch.no_grad()
def reference_decode(sam: torch.nn.Module, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
                     multimask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's own prompt encoder + mask decoder for prompts of one tile (as ``SamPredictor.predict_torch``)."""
    sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    return sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                            multimask_output=multimask)


def decode_points(decoder: PromptDecoder, blocks: Sequence[Block], field_shape: tuple[int, int],
                  tile: np.ndarray, points: np.ndarray, batch_size: int = 64, multimask: bool = False,
                  keep: Callable[[MaskBatch, np.ndarray], np.ndarray] | None = None,
                  on_device: bool = False) -> Candidates | DeviceCandidates:
    """Candidate masks for point prompts (y, x in field coordinates), each decoded against the embedding of
    ``blocks[tile[k]]`` (``set_tiles`` order) over the tile with its halo.

    Prompts of all tiles with the same outer shape share batches. ``keep(batch, iou)`` filters
    each batch before it is stored, so memory holds only the surviving masks. With ``on_device`` the pixel
    lists stay on the decoder's device (``device_masks.DeviceCandidates``, for ``device_masks.assemble``).
    """
    take = dm.csr_take if on_device else csr_take
    tile = np.asarray(tile, np.int64)
    points = np.asarray(points, np.float64)
    parts = []
    shapes = [b.outer_shape for b in blocks]
    origins = np.array([[b.outer[0].start, b.outer[1].start] for b in blocks], np.int64)
    # prompts grouped by the outer shape of their tile (border tiles differ), sorted by tile within a group
    shape_ids, shape_of_tile = np.unique(np.array(shapes), axis=0, return_inverse=True)
    order = np.lexsort((tile, shape_of_tile.ravel()[tile]))
    group_of = shape_of_tile.ravel()[tile][order]
    for g in np.unique(group_of):
        members = order[group_of == g]
        shape = tuple(int(v) for v in shape_ids[g])
        ih, iw = input_size(shape)
        scale = np.array([iw / shape[1], ih / shape[0]])
        for s in range(0, len(members), batch_size):
            idx = members[s:s + batch_size]
            local = points[idx] - origins[tile[idx]]
            coords = torch.as_tensor(local[:, ::-1] * scale, dtype=torch.float32)[:, None, :]
            logits, iou = decoder.decode(torch.as_tensor(tile[idx]), coords, multimask=multimask,
                                         extent=low_res_extent(shape))
            m = logits.shape[1]
            mb = upsample_masks(logits.flatten(0, 1), shape, np.repeat(origins[tile[idx]], m, axis=0),
                                field_shape[1], on_device=on_device)
            iou_np = iou.flatten().float().cpu().numpy()
            pts = np.repeat(points[idx], m, axis=0)
            sel = np.flatnonzero(keep(mb, iou_np) if keep is not None else np.ones(len(iou_np), bool))
            ptr, pix = take(torch.as_tensor(mb.ptr, device=decoder.device) if on_device else mb.ptr, mb.pixels, sel)
            ptr = ptr.cpu().numpy() if on_device else ptr
            parts.append((ptr, pix, mb.area[sel], iou_np[sel], mb.stability[sel], mb.bbox[sel], pts[sel]))
    if on_device:
        return DeviceCandidates.concat(tuple(field_shape), parts, decoder.device)
    return Candidates.concat(tuple(field_shape), parts)
