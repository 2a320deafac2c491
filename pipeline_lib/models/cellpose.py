"""Cellpose-SAM weights: resolve published models through cellpose's own cache, build the network from a file.

Published names (``cpsam``, ``cpsam_v2`` in cellpose 4.2) are fetched with cellpose's own downloader
(``cellpose.utils.download_url_to_file`` from ``cellpose.models._MODEL_URL``) into cellpose's cache
(``cellpose.models.MODEL_DIR``: ``$CELLPOSE_LOCAL_MODELS_PATH`` or ``~/.cellpose/models``), so a user's
existing cache is reused. Differences to cellpose: a local file that does not exist is an error naming it
(``CellposeModel`` silently downloads its default model instead), and the file's xxh128 is returned for
provenance (cellpose checks no hash).

The network is cellpose's own class (``cellpose.vit.CPSAM``, its ``forward``), but its encoder is built from
the shapes in the state dict (embedding width, depth, heads, patch size, input size, readout), not from the
hard-coded SAM ViT-L, so a small random model in the same file layout (``write_tiny_cellpose``) loads through
the same code as the published weights. The published weights were trained on data under non-commercial
licences (cellpose's model card: CC-BY-NC).
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .download import file_xxh128
from .loading import ModelLoadError

PUBLISHED = ("cpsam", "cpsam_v2")  # SAM-backbone models of cellpose 4.2 (cpdino needs dinov3: not supported)


@dataclass(frozen=True)
class CellposeArch:
    """The architecture of a CPSAM state dict, read off its shapes."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    input_size: int  # tile size the position embedding was made for (256 for cpsam)
    mlp_dim: int
    neck_dim: int
    nout: int
    rel_pos: tuple[int, ...]  # per block, length of the relative position table (cellpose keeps SAM's)

    def to_dict(self) -> dict:
        return asdict(self)


def _state_dict(path: str | os.PathLike) -> OrderedDict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same actionable message
        raise ModelLoadError(f"cannot read Cellpose model '{path}' ({type(e).__name__}: {e}).") from e
    if not isinstance(sd, dict) or "W2" not in sd and "module.W2" not in sd:
        raise ModelLoadError(f"'{path}' is not a Cellpose 4 (CPSAM) state dict (no 'W2'); Cellpose 3 models "
                             "and other files are not supported. Use model.name cpsam or a cpsam file.")
    if next(iter(sd)).startswith("module."):
        sd = OrderedDict((k[len("module."):], v) for k, v in sd.items())
    if "encoder.cls_token" in sd:
        raise ModelLoadError(f"'{path}' is a Cellpose DINO model (cpdino); only SAM-backbone models (cpsam) "
                             "are supported.")
    return OrderedDict(sd)


def read_arch(sd: dict) -> CellposeArch:
    """Architecture from the shapes of a CPSAM state dict (heads from the relative-position tables)."""
    w = sd["encoder.patch_embed.proj.weight"]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.blocks\.(\d+)\.", k)))
    head_dim = sd["encoder.blocks.0.attn.rel_pos_h"].shape[1]
    return CellposeArch(
        embed_dim=int(w.shape[0]), depth=depth, num_heads=int(w.shape[0]) // int(head_dim),
        patch_size=int(w.shape[-1]), input_size=int(sd["encoder.pos_embed"].shape[1]) * int(w.shape[-1]),
        mlp_dim=int(sd["encoder.blocks.0.mlp.lin1.weight"].shape[0]),
        neck_dim=int(sd["encoder.neck.0.weight"].shape[0]), nout=int(sd["W2"].shape[1]),
        rel_pos=tuple(int(sd[f"encoder.blocks.{i}.attn.rel_pos_h"].shape[0]) for i in range(depth)))


def _encoder(arch: CellposeArch) -> torch.nn.Module:
    """SAM's ImageEncoderViT with the given shapes, as CPSAM holds it (ps x ps patches, global attention)."""
    from functools import partial

    from segment_anything.modeling.image_encoder import ImageEncoderViT
    grid = arch.input_size // arch.patch_size
    enc = ImageEncoderViT(img_size=arch.input_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim,
                          depth=arch.depth, num_heads=arch.num_heads, mlp_ratio=arch.mlp_dim / arch.embed_dim,
                          out_chans=arch.neck_dim, qkv_bias=True,
                          norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                          window_size=0, global_attn_indexes=())
    head_dim = arch.embed_dim // arch.num_heads
    for blk, n in zip(enc.blocks, arch.rel_pos):
        blk.window_size = 0  # cellpose: global attention in every layer
        blk.attn.rel_pos_h = torch.nn.Parameter(torch.zeros(n, head_dim))
        blk.attn.rel_pos_w = torch.nn.Parameter(torch.zeros(n, head_dim))
    enc.pos_embed = torch.nn.Parameter(torch.zeros(1, grid, grid, arch.embed_dim))
    return enc


def build_cpsam(arch: CellposeArch, dtype: torch.dtype = torch.float32):
    """An (untrained) ``cellpose.vit.CPSAM`` of architecture ``arch``: cellpose's class and forward."""
    from cellpose.vit import CPSAM, BaseModel
    net = CPSAM.__new__(CPSAM)
    BaseModel.__init__(net, dtype=torch.float32)
    net.rdrop, net.backbone, net.nout, net.ps = 0.4, "sam_vitl", arch.nout, arch.patch_size
    net.encoder = _encoder(arch)
    net.out = torch.nn.Conv2d(arch.neck_dim, arch.nout * arch.patch_size ** 2, kernel_size=1)
    net.W2 = torch.nn.Parameter(torch.eye(arch.nout * arch.patch_size ** 2).reshape(
        arch.nout * arch.patch_size ** 2, arch.nout, arch.patch_size, arch.patch_size), requires_grad=False)
    if dtype != torch.float32:
        net.dtype = dtype
    return net


def load_cellpose_net(path: str | os.PathLike, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32):
    """``cellpose.vit.CPSAM`` with the weights of ``path`` (strict: every key and shape must match)."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"Cellpose model file '{path}' does not exist; give an existing file or a published "
                             f"name ({', '.join(PUBLISHED)}).")
    sd = _state_dict(path)
    net = build_cpsam(read_arch(sd))
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"'{path}' does not match the CPSAM layout read off its own shapes: {e}") from e
    net = net.to(device)
    if dtype != torch.float32:
        net.dtype = dtype
    return net.eval()


def cellpose_cache_dir() -> Path:
    """cellpose's own model cache (``$CELLPOSE_LOCAL_MODELS_PATH`` or ``~/.cellpose/models``)."""
    from cellpose import models
    return Path(models.MODEL_DIR)


def resolve_cellpose(model: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                     progress: bool = True) -> dict[str, str]:
    """Path, name and xxh128 of a Cellpose model: a published name (downloaded once, as cellpose does) or a
    local file. For the ``model`` rule on the submit host; the jobs then load ``checkpoint`` offline."""
    name = str(model)
    if name in PUBLISHED:
        from cellpose import models, utils
        cache = Path(cache_dir) if cache_dir else cellpose_cache_dir()
        target = cache / name
        if not target.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            try:
                utils.download_url_to_file(models._MODEL_URL + name, str(target), progress=progress)
            except OSError as e:
                raise ModelLoadError(
                    f"could not download Cellpose model '{name}' from {models._MODEL_URL + name} ({e}). Without "
                    f"internet access, download it elsewhere and place it at {target}, or give the file's path."
                ) from e
        path = target
    else:
        path = Path(name)
        if not path.is_file():
            raise ModelLoadError(f"Cellpose model file '{name}' does not exist (published names: "
                                 f"{', '.join(PUBLISHED)}). Fix the path; nothing is downloaded instead.")
    read_arch(_state_dict(path))  # fail on the submit host, not in every job
    return {"name": path.name if name not in PUBLISHED else name, "checkpoint": str(path.resolve()),
            "checkpoint_xxh128": file_xxh128(path)}


TINY_CELLPOSE = {"embed_dim": 32, "depth": 2, "num_heads": 2, "neck_dim": 32}


def write_tiny_cellpose(directory: str | os.PathLike, seed: int = 0, embed_dim: int = TINY_CELLPOSE["embed_dim"],
                        depth: int = TINY_CELLPOSE["depth"], num_heads: int = TINY_CELLPOSE["num_heads"],
                        neck_dim: int = TINY_CELLPOSE["neck_dim"], name: str = "cpsam_tiny") -> str:
    """Write an UNTRAINED random CPSAM in the published file layout (a plain ``state_dict`` with the keys of
    ``cellpose.vit.CPSAM``: ``encoder.*`` incl. SAM's relative-position tables of windowed (27) and global
    (127) blocks, ``out.*``, ``W2``, ``diam_labels``, ``diam_mean``); returns its path.

    ``embed_dim=1024, depth=24, num_heads=16, neck_dim=256`` gives the full cpsam shape (ViT-L).
    """
    torch.manual_seed(seed)
    global_blocks = {depth - 1} if depth < 4 else set(range(depth // 4 - 1, depth, depth // 4))
    rel_pos = tuple(127 if i in global_blocks else 27 for i in range(depth))  # SAM: 2*64-1 global, 2*14-1 window
    arch = CellposeArch(embed_dim, depth, num_heads, 8, 256, 4 * embed_dim, neck_dim, 3, rel_pos)
    net = build_cpsam(arch)
    with torch.no_grad():  # SAM initialises these to zero; random values make the test exercise them
        for blk in net.encoder.blocks:
            blk.attn.rel_pos_h.normal_(0, 0.02)
            blk.attn.rel_pos_w.normal_(0, 0.02)
        net.encoder.pos_embed.normal_(0, 0.02)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    torch.save(net.state_dict(), path)
    (directory / f"{name}.README.txt").write_text(
        "UNTRAINED random-weight Cellpose-SAM (CPSAM layout), written by "
        "`python -m pipeline_lib tiny-model --kind cellpose`.\nFor tests only: its segmentations are "
        f"meaningless.\nArchitecture: {arch.to_dict()}, seed={seed}.\n")
    return str(path)
