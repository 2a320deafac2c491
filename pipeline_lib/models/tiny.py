"""Tiny random-weight models (UNTRAINED) in the published file formats, for tests and offline smoke runs.

They are built with the same code path as real models (segment_anything's ``_build_sam``, torch-em's UNETR)
and saved exactly like micro-sam's published files: ``sam.pt`` a plain SAM state dict, ``decoder.pt`` the
decoder state dict. Their predictions are meaningless; they exercise loading, shapes and the workflow.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch

from .loading import InstanceDecoder

TINY_ARCH = {"encoder_embed_dim": 32, "encoder_depth": 2, "encoder_num_heads": 2, "encoder_global_attn_indexes": [1]}
TINY_DECODER_FEATURES = 8
TINY_LOGIT_SCALE = 100.0


def build_tiny(seed: int = 0, conv_transpose: bool = False, logit_scale: float = TINY_LOGIT_SCALE):
    """(sam, decoder) with random weights from ``seed``.

    The output layers of the mask hypernetworks are scaled by ``logit_scale``: with PyTorch's default init the
    mask logits stay within +-0.5, so every stability score would be 0 and APG/AMG scores would all tie.
    """
    from segment_anything.build_sam import _build_sam
    torch.manual_seed(seed)
    sam = _build_sam(checkpoint=None, **TINY_ARCH)
    with torch.no_grad():
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight *= logit_scale
            mlp.layers[-1].bias *= logit_scale
    decoder = InstanceDecoder(sam.image_encoder, None, use_conv_transpose=conv_transpose,
                              initial_features=TINY_DECODER_FEATURES)
    return sam.eval(), decoder.eval()


def write_tiny_model(directory: str | os.PathLike, seed: int = 0, conv_transpose: bool = False,
                     training_checkpoint: bool = False) -> dict[str, str]:
    """Write ``sam.pt`` + ``decoder.pt`` (or one training checkpoint ``checkpoint.pt``) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sam, decoder = build_tiny(seed, conv_transpose)
    sam_state = OrderedDict(sam.state_dict())
    dec_state = decoder.decoder_state_dict()
    if training_checkpoint:
        path = directory / "checkpoint.pt"
        torch.save({"model_state": OrderedDict((f"sam.{k}", v) for k, v in sam_state.items()),
                    "decoder_state": dec_state}, path)
        return {"checkpoint": str(path)}
    torch.save(sam_state, directory / "sam.pt")
    torch.save(dec_state, directory / "decoder.pt")
    (directory / "README.txt").write_text(
        "UNTRAINED tiny random-weight SAM + decoder, written by `python -m pipeline_lib tiny-model`.\n"
        "For tests and offline smoke runs only: its segmentations are meaningless.\n"
        f"Architecture: {TINY_ARCH}, decoder initial_features={TINY_DECODER_FEATURES}, seed={seed}, "
        f"mask hypernetwork output x{TINY_LOGIT_SCALE}.\n"
        "Use with: model: {checkpoint: DIR/sam.pt, decoder: DIR/decoder.pt}\n")
    return {"checkpoint": str(directory / "sam.pt"), "decoder": str(directory / "decoder.pt")}
