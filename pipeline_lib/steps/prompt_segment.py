"""APG / AMG for one batch of fields in one GPU job: embed each field, decode its prompts, write its labels.

The embeddings of a field stay on the device while its prompts are decoded (they are never written to
disk: 2-4 MB per tile); the decoder maps are also written to predictions.ome.zarr for QC (APG only).
With ``predictions`` set, APG takes its maps from that store and runs only SAM (encoder + prompts).

Fields flow through a bounded pipeline (``engine.overlap``), one thread per stage: read + preprocess the
next field, encode (and decode maps of) the current one, derive/decode/NMS/paint the prompts of the
previous one, write labels, maps and pyramids of the one before. The device-busy fraction and the stage
split go into the job's marker and log. ``overlap=False`` runs the same stages field after field.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from typing import Any, Callable

import numpy as np
import zarr
from tqdm import tqdm

from ..config import amg_params, apg_params
from ..embed import device_masks
from ..embed.predict import embed_prepared, prepare_field
from ..embed.prompt_decoder import PromptDecoder, decode_points
from ..engine.overlap import DeviceClock, StageTimes, run_pipeline, timing_line
from ..engine.runner import UNIT_ERRORS, debug, describe, failed, log_failure, run_units
from ..instances.apg import amg_segment, apg_segment, assemble
from ..methods import get_method
from .large_field import is_large, segment_large_field
from .model import load_resolved
from .plan import recheck_field
from .predict import field_task
from .segment import write_batch_outputs, write_field_labels


def read_maps(path: str) -> np.ndarray:
    """A field's (3, Y, X) decoder maps from a predictions store, as float32 (shape checked by the plan)."""
    return np.asarray(zarr.open_array(os.path.join(path, "0"), mode="r")[...], dtype=np.float32)


MAX_FIELDS_IN_FLIGHT = 3  # e.g. read i+2, encode i+1, prompts/write i: at most 3 fields of data (embeddings)


def _timed(fn: Callable, clock: DeviceClock | None) -> Callable:
    if clock is None:
        return fn

    def run(*a):
        with clock.busy():
            return fn(*a)
    return run


def _on_device(decoder: PromptDecoder) -> bool:
    """Candidates stay on the decoder's device (torch NMS and painting) when it is a GPU."""
    return decoder.device.type != "cpu"


def prompt_labels(cfg: dict[str, Any], decoder: PromptDecoder, blocks: list, emb, maps: np.ndarray | None,
                  shape: tuple[int, int], tile: int, clock: DeviceClock | None = None) -> tuple[np.ndarray, dict]:
    """Labels of one 2D image from its tile embeddings (and, for APG, its decoder maps), by the configured
    prompt method's instance step (``methods.Method.instances``: :func:`apg_labels`, :func:`amg_labels`)."""
    _timed(decoder.set_tiles, clock)(emb)
    return get_method(cfg).step("instances")(cfg, decoder, blocks, maps, shape, tile, clock)


def apg_labels(cfg: dict[str, Any], decoder: PromptDecoder, blocks: list, maps: np.ndarray,
               shape: tuple[int, int], tile: int, clock: DeviceClock | None = None) -> tuple[np.ndarray, dict]:
    """APG: point prompts from the decoder maps, decoded by SAM on the tiles set in ``decoder``."""
    p = apg_params(cfg)
    keep = (lambda mb, iou: mb.area > p.min_size)
    dev = _on_device(decoder)
    decode = (lambda t, pts: decode_points(decoder, blocks, shape, t, pts, cfg["apg"]["batch_size"], keep=keep,
                                           on_device=dev))
    return apg_segment(maps, tile, _timed(decode, clock), p, device_masks.assemble if dev else assemble)


def amg_labels(cfg: dict[str, Any], decoder: PromptDecoder, blocks: list, maps: None,
               shape: tuple[int, int], tile: int, clock: DeviceClock | None = None) -> tuple[np.ndarray, dict]:
    """AMG: a point grid per tile, three masks per point, filtered by predicted IoU and stability."""
    p = amg_params(cfg)
    keep = (lambda mb, iou: (iou > p.pred_iou_threshold) & (mb.stability >= p.stability_score_threshold)
            & (mb.area > 0))
    dev = _on_device(decoder)
    decode = (lambda t, pts: decode_points(decoder, blocks, shape, t, pts, cfg["amg"]["batch_size"],
                                           multimask=True, keep=keep, on_device=dev))
    return amg_segment(shape, blocks, _timed(decode, clock), p, device_masks.assemble if dev else assemble)


def field_stages(cfg: dict[str, Any], plan: dict[str, Any], model, decoder: PromptDecoder,
                 clock: DeviceClock | None = None) -> list[tuple[str, Callable]]:
    """The per-field stages (read, device, prompts, write) over plan field entries; the last returns
    (status info, object table)."""
    spec = get_method(cfg)
    run_decoder = spec.needs_decoder(cfg)
    read_given = spec.store is not None and not run_decoder  # e.g. APG on given maps
    tile, halo = cfg["tiling"]["tile"], cfg["tiling"]["halo"]

    def timed(name: str, fn: Callable) -> tuple[str, Callable]:
        def run(st: dict) -> dict:
            t0 = time.perf_counter()
            out = fn(st)
            out["seconds"] = out.get("seconds", 0.0) + time.perf_counter() - t0
            return out
        return name, run

    def read(f: dict) -> dict:
        f = recheck_field(cfg, plan, f)
        task = field_task(cfg, plan, f, with_predictions=run_decoder)
        maps = read_maps(f["predictions"]) if read_given else None
        return {"f": f, "task": task, "tiles": prepare_field(task, tile, halo), "maps": maps}

    def device(st: dict) -> dict:
        tiles = st.pop("tiles")
        st["blocks"] = [t.block for t in tiles]
        st["emb"], maps = embed_prepared(model, tiles, cfg["encoder"]["batch_size"], cfg["encoder"]["precision"],
                                         with_maps=run_decoder, clock=clock)
        if run_decoder:
            st["maps"] = maps
        return st

    def prompts(st: dict) -> dict:
        emb = st.pop("emb")
        st["labels"], st["info"] = prompt_labels(cfg, decoder, st["blocks"], emb, st["maps"],
                                                 tuple(st["task"].image.shape), tile, clock)
        return st

    def write(st: dict) -> dict:
        task = st["task"]
        if run_decoder and task.out is not None:
            task.out[...] = st["maps"].astype(np.float16)
        st["table"] = write_field_labels(cfg, plan, st["f"], st.pop("labels"))
        return st

    return [timed("read", read), timed("device", device), timed("prompts", prompts), timed("write", write)]


def _field_status(st: dict) -> dict:
    n = len(st["table"])
    return {"status": "ok" if n else "empty", "n_objects": n, **st["info"], "seconds": round(st["seconds"], 3)}


def run_prompt_segment_batch(cfg: dict[str, Any], plan: dict[str, Any], batch: str, model_info: dict[str, Any],
                             out_json: str, overlap: bool = True) -> dict[str, Any]:
    """Segment every field of ``batch``; a field that fails is reported by name, the others finish."""
    fields = [plan["fields"][i] for i in plan["batches"][batch]]
    model = load_resolved(model_info, cfg["model"]["device"],
                          require_decoder=get_method(cfg).needs_decoder(cfg),
                          compile=cfg["encoder"]["compile"])
    decoder = PromptDecoder(model.sam)
    clock, times = DeviceClock(model.device), StageTimes()
    large = [f for f in fields if is_large(cfg, f.get("shape") or (0, 0))]
    fields = [f for f in fields if not is_large(cfg, f.get("shape") or (0, 0))]
    status = run_units([(f["key"], f) for f in large],  # one at a time, each block by block (bounded memory)
                       lambda f: segment_large_field(cfg, plan, recheck_field(cfg, plan, f), model, decoder, clock)[0],
                       f"{cfg['method']} {batch} (large fields)", on_error=lambda f, err: failed(err, n_objects=0))
    stages = field_stages(cfg, plan, model, decoder, clock)
    bar = tqdm(total=len(fields), desc=f"{cfg['method']} {batch} ({model.device})", unit="field", file=sys.stderr)
    with bar, contextlib.closing(run_pipeline(fields, stages, depth=1, threaded=overlap, times=times,
                                                         max_in_flight=MAX_FIELDS_IN_FLIGHT)) as outs:
        for out in outs:
            key = out.item["key"]
            if isinstance(out.error, UNIT_ERRORS):
                if debug():
                    traceback.print_exception(out.error)
                status[key] = failed(describe(out.error), n_objects=0)
                log_failure(f"{cfg['method']} {batch}", key, status[key]["error"])
            elif out.error is not None:
                raise out.error
            else:
                status[key] = _field_status(out.value)
            bar.update(1)
    timing = {**clock.report(times), "overlap": overlap}
    print(timing_line(f"{cfg['method']} {batch}", timing), file=sys.stderr)
    return write_batch_outputs(batch, status, out_json, device=str(model.device),
                               method=cfg["method"], timing=timing)
