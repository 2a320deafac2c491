"""The SDPA image encoder (embed.encoder) equals segment_anything's ImageEncoderViT with the same weights.

Shapes: the published ViT-B/L/H widths, heads, window size 14 and relative-position tables, but a smaller
input (512 for ViT-B, 256 for L and H; grids 32 and 16, so windows are padded as at 1024) and two blocks
per shape (block 0 windowed, block 1 global), so that the test takes seconds on two cores. The
relative-position tables and the absolute position embedding are random (SAM initialises them to zero,
which would not test the bias).
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from pipeline_lib.embed.encoder import SdpaImageEncoderViT, accelerate_encoder

SHAPES = {  # name: (embed_dim, heads, img_size)
    "vit_b": (768, 12, 512),
    "vit_l": (1024, 16, 256),
    "vit_h": (1280, 16, 256),
}


def stock_encoder(embed_dim: int, heads: int, img_size: int, depth: int = 2, seed: int = 0):
    from segment_anything.modeling.image_encoder import ImageEncoderViT
    torch.manual_seed(seed)
    enc = ImageEncoderViT(img_size=img_size, patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=heads,
                          mlp_ratio=4, out_chans=256, qkv_bias=True,
                          norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                          window_size=14, global_attn_indexes=[depth - 1])
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "rel_pos" in name or name == "pos_embed":
                p.normal_(0, 0.5)
    return enc.eval()


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sdpa_encoder_equals_stock(name, precision):
    embed_dim, heads, img_size = SHAPES[name]
    stock = stock_encoder(embed_dim, heads, img_size)
    ours = accelerate_encoder(copy.deepcopy(stock))
    assert isinstance(ours, SdpaImageEncoderViT)
    assert [k for k, _ in ours.state_dict().items()] == [k for k, _ in stock.state_dict().items()]
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(1)) * 50
    with torch.no_grad():
        ref32 = stock(x)
        if precision == "fp32":
            got = ours(x)
            torch.testing.assert_close(got, ref32, rtol=1e-4, atol=1e-4)
            return
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref, got = stock(x).float(), ours(x).float()
    # bf16 vs bf16: both within bf16 rounding of each other and of the fp32 output (values are O(1))
    assert (got - ref).abs().mean() < 0.02
    assert (got - ref32).abs().mean() < 2 * (ref - ref32).abs().mean() + 0.01
    assert torch.corrcoef(torch.stack([got.ravel(), ref32.ravel()]))[0, 1] > 0.999


@pytest.mark.parametrize("limit", [2 * 256 * 256, 2 * 256 * 16 * 3])  # one image per call; 3 of 16 grid rows
def test_chunked_global_attention_equals_one_call(monkeypatch, limit):
    """Global blocks split the batch (into images, then query rows) when the bias would be large: same result."""
    import pipeline_lib.embed.encoder as enc_mod
    stock = stock_encoder(64, 2, 256, seed=3)
    ours = accelerate_encoder(copy.deepcopy(stock))
    x = torch.randn(3, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = ours(x)
        monkeypatch.setattr(enc_mod, "ATTN_BIAS_ELEMENTS", limit)
        chunked = ours(x)
        ref = stock(x)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole, ref, rtol=1e-4, atol=1e-4)


def test_loading_swaps_encoder_and_keeps_names(tmp_path):
    """The tiny model's files load into the SDPA encoder, parameters by the same names, same embeddings."""
    from pipeline_lib.models.loading import load_model_files
    from pipeline_lib.models.tiny import write_tiny_model
    files = write_tiny_model(tmp_path)
    fast = load_model_files(files["checkpoint"], files["decoder"], device="cpu")
    stock = load_model_files(files["checkpoint"], files["decoder"], device="cpu", encoder="stock")
    assert isinstance(fast.sam.image_encoder, SdpaImageEncoderViT)
    assert not isinstance(stock.sam.image_encoder, SdpaImageEncoderViT)
    assert list(fast.sam.state_dict()) == list(stock.sam.state_dict())
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fast.sam.image_encoder(x), stock.sam.image_encoder(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_encoder_equals_eager(tmp_path):
    """``encoder.compile`` (torch.compile through load_model_files) gives the eager outputs (CPU inductor
    needs a C++ compiler; compiling takes tens of seconds, hence slow)."""
    import shutil
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler for torch.compile on CPU")
    from pipeline_lib.models.loading import load_model_files
    from pipeline_lib.models.tiny import write_tiny_model
    files = write_tiny_model(tmp_path)
    eager = load_model_files(files["checkpoint"], device="cpu")
    compiled = load_model_files(files["checkpoint"], device="cpu", compile=True)
    assert list(compiled.sam.state_dict()) == list(eager.sam.state_dict())
    x = torch.randn(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(compiled.sam.image_encoder(x), eager.sam.image_encoder(x), rtol=1e-4, atol=1e-4)
