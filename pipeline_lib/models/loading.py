"""Build SAM and the instance-segmentation decoder from weight files in the published layouts.

Layouts understood (as micro-sam writes them):
  * a plain SAM state dict (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``), plus an
    optional separate decoder state dict (``base.*``, ``decoder.*``, ``deconv1..4.*``, ...);
  * one training checkpoint ``{"model_state": {"sam.<key>": ...}, "decoder_state": {...}}``.
The architecture is read off the weights (embedding width, depth, heads, global-attention blocks,
decoder width and upsampling layout), so full-size published models and tiny test models go through
the same code.
"""
from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

DECODER_PREFIXES = ("base.", "decoder.", "deconv1.", "deconv2.", "deconv3.", "deconv4.", "deconv_out.",
                    "decoder_head.", "out_conv.")


class ModelLoadError(RuntimeError):
    """A model file is missing, unreadable or not in a known layout."""


@dataclass
class SamModel:
    """A loaded SAM (``segment_anything.modeling.Sam``) plus the optional decoder (``InstanceDecoder``)."""

    sam: torch.nn.Module
    decoder: torch.nn.Module | None
    model_type: str
    device: torch.device
    name: str
    files: dict[str, str] = field(default_factory=dict)


class _LenientUnpickler(pickle.Unpickler):
    """Skip classes that cannot be imported (torch_em training checkpoints pickle optimizer objects)."""

    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (AttributeError, ModuleNotFoundError):
            return None


class _LenientPickle:
    Unpickler = _LenientUnpickler
    load = pickle.load
    loads = pickle.loads
    __name__ = "pickle"


def _torch_load(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"Model file '{path}' does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_LenientPickle)
    except Exception as e:  # noqa: BLE001 - report which file is broken
        raise ModelLoadError(f"Could not read model file '{path}': {e}. Is it a PyTorch checkpoint?") from e


def split_checkpoint(state: dict) -> tuple[OrderedDict, OrderedDict | None]:
    """(sam_state, decoder_state or None) from a plain SAM state dict or a training checkpoint."""
    if "model_state" in state:
        sam_state = OrderedDict((k[4:] if k.startswith("sam.") else k, v) for k, v in state["model_state"].items())
        return sam_state, state.get("decoder_state")
    return OrderedDict(state), None


def sniff_model_type(sam_state: dict) -> str:
    """vit_b / vit_l / vit_h from the patch embedding width; vit_t (MobileSAM) when it is absent."""
    key = "image_encoder.patch_embed.proj.weight"
    if key not in sam_state:
        return "vit_t"
    width = sam_state[key].shape[0]
    return {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}.get(width, f"vit_custom{width}")


def _encoder_architecture(sam_state: dict) -> dict:
    embed_dim = sam_state["image_encoder.patch_embed.proj.weight"].shape[0]
    blocks = sorted({int(m.group(1)) for k in sam_state
                     if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))})
    depth = len(blocks)
    rel = sam_state["image_encoder.blocks.0.attn.rel_pos_h"]
    head_dim = rel.shape[1]
    grid = sam_state["image_encoder.pos_embed"].shape[1]  # 64 for 1024 / 16
    global_idx = [i for i in blocks if sam_state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] == 2 * grid - 1]
    return {"encoder_embed_dim": embed_dim, "encoder_depth": depth, "encoder_num_heads": embed_dim // head_dim,
            "encoder_global_attn_indexes": global_idx}


def build_sam(sam_state: dict, encoder: str = "sdpa") -> tuple[torch.nn.Module, str]:
    """A SAM module with the architecture read off ``sam_state`` and those weights loaded.

    ``encoder="sdpa"`` swaps segment_anything's ViT encoder for the restructured one
    (``embed.encoder``: same parameter names, same outputs up to float rounding); ``"stock"`` keeps it.
    """
    model_type = sniff_model_type(sam_state)
    if model_type == "vit_t":
        try:
            from mobile_sam import sam_model_registry as mobile_registry  # type: ignore
        except ImportError:
            raise ModelLoadError(
                "This checkpoint is a vit_t (MobileSAM) model, which needs the 'mobile_sam' package: "
                "pip install git+https://github.com/ChaoningZhang/MobileSAM.git") from None
        sam = mobile_registry["vit_t"]()
    else:
        from segment_anything.build_sam import _build_sam
        sam = _build_sam(checkpoint=None, **_encoder_architecture(sam_state))
        if encoder == "sdpa":
            from ..embed.encoder import accelerate_encoder
            sam.image_encoder = accelerate_encoder(sam.image_encoder)
    missing, unexpected = sam.load_state_dict(sam_state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"SAM weights do not fit a {model_type} model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    return sam, model_type


def decoder_uses_conv_transpose(decoder_state: dict) -> bool:
    """micro-sam's rule: any ``decoder.samplers*`` key with ``.block.`` means transposed convolutions."""
    return any(".block." in k for k in decoder_state if k.startswith("decoder.samplers"))


class InstanceDecoder(torch.nn.Module):
    """torch-em's UNETR decoder (no skip connections) applied to precomputed SAM embeddings.

    Mirrors micro-sam's ``DecoderAdapter``: ``forward_features`` runs the convolutional decoder on a batch
    of embeddings (B, 256, 64, 64) -> (B, 3, 512, 512) sigmoid maps; ``resample`` brings one tile's maps to
    the tile's size the way SAM resamples masks.
    """

    def __init__(self, image_encoder: torch.nn.Module, decoder_state: dict | None = None,
                 use_conv_transpose: bool | None = None, initial_features: int | None = None):
        super().__init__()
        from torch_em.model import UNETR
        if use_conv_transpose is None:
            use_conv_transpose = decoder_uses_conv_transpose(decoder_state) if decoder_state else False
        if initial_features is None:
            initial_features = 64
            if decoder_state is not None and "out_conv.weight" in decoder_state:
                initial_features = int(decoder_state["out_conv.weight"].shape[1])
        unetr = UNETR(backbone="sam", encoder=image_encoder, out_channels=3, use_sam_stats=True,
                      final_activation="Sigmoid", use_skip_connection=False, resize_input=True,
                      use_conv_transpose=use_conv_transpose, initial_features=initial_features)
        self.use_conv_transpose = use_conv_transpose
        self.initial_features = initial_features
        for name in ("base", "decoder", "deconv1", "deconv2", "deconv3", "deconv4", "deconv_out",
                     "decoder_head", "out_conv"):
            setattr(self, name, getattr(unetr, name))
        self.final_activation = unetr.final_activation
        self._img_size = image_encoder.img_size
        if decoder_state is not None:
            state = {k: v for k, v in decoder_state.items() if k.startswith(DECODER_PREFIXES)}
            missing, unexpected = self.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("final_activation")]
            if missing:
                raise ModelLoadError(f"Decoder weights are missing {len(missing)} parameters, e.g. {missing[:3]}")

    def forward_features(self, z12: torch.Tensor) -> torch.Tensor:
        z9 = self.deconv1(z12)
        z6 = self.deconv2(z9)
        z3 = self.deconv3(z6)
        z0 = self.deconv4(z3)
        x = self.base(z12)
        x = self.decoder(x, encoder_inputs=[z9, z6, z3])
        x = self.deconv_out(x)
        x = self.decoder_head(torch.cat([x, z0], dim=1))
        x = self.out_conv(x)
        return self.final_activation(x) if self.final_activation is not None else x

    def resample(self, maps: torch.Tensor, input_size: tuple[int, int],
                 original_size: tuple[int, int]) -> torch.Tensor:
        """(B, 3, h, w) decoder output -> (B, 3, *original_size), as torch-em's ``postprocess_masks``."""
        f = torch.nn.functional
        maps = f.interpolate(maps, (self._img_size, self._img_size), mode="bilinear", align_corners=False)
        maps = maps[..., : input_size[0], : input_size[1]]
        return f.interpolate(maps, tuple(original_size), mode="bilinear", align_corners=False)

    def decoder_state_dict(self) -> OrderedDict:
        """The state dict in the published decoder-file layout."""
        return OrderedDict((k, v) for k, v in self.state_dict().items() if k.startswith(DECODER_PREFIXES))


def select_device(device: str | None = "auto") -> torch.device:
    """cuda, then mps, then cpu for 'auto'; an explicit device must be available."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"model.device is '{device}' but PyTorch sees no CUDA device here; use 'auto' or 'cpu'.")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError(f"model.device is '{device}' but the MPS backend is not available; use 'auto' or 'cpu'.")
    return dev


def load_model_files(checkpoint: str | os.PathLike, decoder: str | os.PathLike | None = None,
                     device: str | None = "auto", name: str | None = None,
                     require_decoder: bool = False, encoder: str = "sdpa", compile: bool = False) -> SamModel:
    """Load SAM (+ decoder) from local files in any published layout.

    ``encoder``: ``"sdpa"`` (default, ``embed.encoder``) or ``"stock"`` (segment_anything's module);
    ``compile``: ``torch.compile`` the image encoder in place (config ``encoder.compile``).
    """
    state = _torch_load(checkpoint)
    if not isinstance(state, dict):
        raise ModelLoadError(f"'{checkpoint}' does not hold a state dict.")
    sam_state, decoder_state = split_checkpoint(state)
    if decoder is not None:
        decoder_state = _torch_load(decoder)
    sam, model_type = build_sam(sam_state, encoder)
    dec = None
    if decoder_state is not None:
        dec = InstanceDecoder(sam.image_encoder, decoder_state)
    elif require_decoder:
        raise ModelLoadError(
            f"The model '{name or checkpoint}' has no instance-segmentation decoder, but method 'ais' needs one. "
            "Use a micro-sam model with decoder (e.g. vit_b_lm), pass model.decoder, or use method 'amg'.")
    dev = select_device(device)
    sam.eval().to(dev)
    if dec is not None:
        dec.eval().to(dev)
    if compile:
        from ..embed.encoder import compile_encoder
        compile_encoder(sam.image_encoder)
    files = {"checkpoint": str(checkpoint)}
    if decoder is not None:
        files["decoder"] = str(decoder)
    return SamModel(sam=sam, decoder=dec, model_type=model_type, device=dev, name=name or Path(checkpoint).stem,
                    files=files)
