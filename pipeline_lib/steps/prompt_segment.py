"""APG / AMG for one batch of fields in one GPU job: embed each field, decode its prompts, write its labels.

The embeddings of a field stay on the device while its prompts are decoded (they are never written to
disk: 2-4 MB per tile); the decoder maps are also written to predictions.ome.zarr for QC (APG only).
With ``predictions`` set, APG takes its maps from that store and runs only SAM (encoder + prompts).
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import zarr

from ..config import amg_params, apg_params
from ..embed.predict import embed_field
from ..embed.prompt_decoder import PromptDecoder, decode_points
from ..engine.runner import failed, run_units
from ..instances.apg import amg_segment, apg_segment
from .model import load_resolved
from .plan import recheck_field
from .predict import field_task
from .segment import write_batch_outputs, write_field_labels


def read_maps(path: str) -> np.ndarray:
    """A field's (3, Y, X) decoder maps from a predictions store, as float32 (shape checked by the plan)."""
    return np.asarray(zarr.open_array(os.path.join(path, "0"), mode="r")[...], dtype=np.float32)


def prompt_labels(cfg: dict[str, Any], decoder: PromptDecoder, blocks: list, emb, maps: np.ndarray | None,
                  shape: tuple[int, int], tile: int) -> tuple[np.ndarray, dict]:
    """APG or AMG labels of one 2D image from its tile embeddings (and, for APG, its decoder maps)."""
    decoder.set_tiles(emb)
    if cfg["method"] == "apg":
        p = apg_params(cfg)
        keep = (lambda mb, iou: mb.area > p.min_size)
        decode = (lambda t, pts: decode_points(decoder, blocks, shape, t, pts, cfg["apg"]["batch_size"], keep=keep))
        return apg_segment(maps, tile, decode, p)
    p = amg_params(cfg)
    keep = (lambda mb, iou: (iou > p.pred_iou_threshold) & (mb.stability >= p.stability_score_threshold)
            & (mb.area > 0))
    decode = (lambda t, pts: decode_points(decoder, blocks, shape, t, pts, cfg["amg"]["batch_size"],
                                           multimask=True, keep=keep))
    return amg_segment(shape, blocks, decode, p)


def segment_field_prompts(cfg: dict[str, Any], plan: dict[str, Any], f: dict[str, Any], model,
                          decoder: PromptDecoder) -> tuple[dict, Any]:
    method = cfg["method"]
    t0 = time.time()
    run_decoder = method == "apg" and not cfg["predictions"]
    task = field_task(cfg, plan, f, with_predictions=run_decoder)
    tile, halo = cfg["tiling"]["tile"], cfg["tiling"]["halo"]
    blocks, emb, maps = embed_field(model, task, tile, halo, cfg["encoder"]["batch_size"],
                                    cfg["encoder"]["precision"], with_maps=run_decoder)
    if method == "apg" and maps is None:  # decoder maps given by `predictions`
        maps = read_maps(f["predictions"])
    labels, info = prompt_labels(cfg, decoder, blocks, emb, maps, tuple(task.image.shape), tile)
    table = write_field_labels(cfg, plan, f, labels)
    n = len(table)
    return {"status": "ok" if n else "empty", "n_objects": n, **info, "seconds": round(time.time() - t0, 3)}, table


def run_prompt_segment_batch(cfg: dict[str, Any], plan: dict[str, Any], batch: str, model_info: dict[str, Any],
                             out_json: str) -> dict[str, Any]:
    """Segment every field of ``batch``; a field that fails is reported by name, the others finish."""
    fields = [plan["fields"][i] for i in plan["batches"][batch]]
    model = load_resolved(model_info, cfg["model"]["device"],
                          require_decoder=cfg["method"] == "apg" and not cfg["predictions"])
    decoder = PromptDecoder(model.sam)

    def work(f: dict[str, Any]) -> dict[str, Any]:
        return segment_field_prompts(cfg, plan, recheck_field(cfg, plan, f), model, decoder)[0]

    status = run_units([(f["key"], f) for f in fields], work, f"{cfg['method']} {batch} ({model.device})",
                       on_error=lambda f, err: failed(err, n_objects=0))
    return write_batch_outputs(batch, status, out_json, device=str(model.device),
                               method=cfg["method"])
