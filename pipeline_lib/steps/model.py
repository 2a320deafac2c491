"""Resolve the configured model to local files (downloading published ones), before any tile work."""
from __future__ import annotations

import os
from typing import Any

from ..models.download import ensure_published, file_xxh128
from ..models.loading import ModelLoadError, SamModel, _torch_load, load_model_files
from ..models.registry import get_published


#: Root attribute of a predictions store that says where its maps came from (see mark_predictions_source).
SOURCE_KEY = "pipeline_lib_predictions_source"


def mark_predictions_source(store: str | os.PathLike, source: dict[str, Any]) -> None:
    """Record in ``store``'s root attributes where its decoder maps came from (e.g. oracle maps from ground
    truth), so that model.json, provenance.json and the report name it."""
    import zarr
    zarr.open_group(str(store), mode="a").attrs[SOURCE_KEY] = source


def predictions_source(store: str | os.PathLike) -> dict[str, Any] | None:
    """The source recorded by :func:`mark_predictions_source`, or None (e.g. maps written by ``predict``)."""
    import zarr
    try:
        return dict(zarr.open_group(str(store), mode="r").attrs.get(SOURCE_KEY) or {}) or None
    except (OSError, ValueError, KeyError, zarr.errors.BaseZarrError):
        return None


def resolve_model(cfg: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Model files and hashes as a JSON-able dict; fails early with an actionable message. With
    ``predictions``, the store and its recorded source (oracle maps, ...) are part of the answer."""
    info = _resolve_model(cfg, progress)
    if cfg.get("predictions"):
        info["predictions"] = str(cfg["predictions"])
        if src := predictions_source(cfg["predictions"]):
            info["predictions_source"] = src
    return info


def _resolve_model(cfg: dict[str, Any], progress: bool) -> dict[str, Any]:
    from ..methods import get_method
    spec = get_method(cfg)
    method = spec.name
    if not spec.uses_model(cfg):
        return {"skipped": True, "reason": f"predictions given: {cfg['predictions']}"}
    if spec.network == "cellpose":
        try:
            import cellpose  # noqa: F401
        except ImportError as e:
            raise ModelLoadError(f"method '{method}' needs cellpose 4.2 ({e}): install the cellpose extra, "
                                 "pip install -e '.[cellpose]' (or pip install 'cellpose>=4.2,<4.3').") from e
        from ..models.cellpose import resolve_cellpose
        return resolve_cellpose(cfg["cellpose"]["model"], cfg["cellpose"]["cache_dir"], progress=progress)
    m = cfg["model"]
    needs_decoder = spec.needs_decoder(cfg)
    if m.get("checkpoint"):
        ckpt = m["checkpoint"]
        if not os.path.isfile(ckpt):
            raise ModelLoadError(f"model.checkpoint '{ckpt}' does not exist.")
        if m.get("decoder") and not os.path.isfile(m["decoder"]):
            raise ModelLoadError(f"model.decoder '{m['decoder']}' does not exist.")
        if needs_decoder and not m.get("decoder") and "decoder_state" not in _torch_load(ckpt):
            raise ModelLoadError(
                f"'{ckpt}' holds no decoder_state and model.decoder is not set, but method '{method}' needs an "
                "instance-segmentation decoder. Give model.decoder, or use method 'amg'.")
        out = {"name": os.path.basename(ckpt), "checkpoint": os.path.abspath(ckpt),
               "checkpoint_xxh128": file_xxh128(ckpt)}
        if m.get("decoder"):
            out.update(decoder=os.path.abspath(m["decoder"]), decoder_xxh128=file_xxh128(m["decoder"]))
        return out
    published = get_published(m["name"])
    if needs_decoder and published.decoder is None:
        raise ModelLoadError(f"model '{m['name']}' (original SAM) has no instance-segmentation decoder, but "
                             f"method '{method}' needs one. Use a micro-sam model such as vit_b_lm, or method 'amg'.")
    return ensure_published(m["name"], m.get("cache_dir"), progress=progress)


def load_resolved(info: dict[str, Any], device: str, require_decoder: bool, compile: bool = False) -> SamModel:
    return load_model_files(info["checkpoint"], info.get("decoder"), device=device, name=info.get("name"),
                            require_decoder=require_decoder, compile=compile)
