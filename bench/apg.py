"""Time our APG against micro-sam's AutomaticPromptGenerator on the same weights, image and decoder maps.

Both sides get the same image embedding (our encoder; its input is tested bit-for-bit against micro-sam's)
and the same decoder maps, so only the APG stage is timed: prompts, prompt decoding, NMS, painting.
The model is the tiny random-weight one (no download); the maps are oracle maps from the ground truth of
the real plate in ../shared/data (or from synthetic blobs when it is absent), so the prompts are realistic.

Needs micro-sam 1.8.14 in the environment (`make bench-env`, then `.venv-bench/bin/python bench/apg.py`).

    python bench/apg.py [--fields 4] [--threads 2] [--crop 0] [--device cpu] [--repeats 1] [--profile]

``--repeats N`` runs both sides N times per field, alternating, and keeps each side's best; ``--profile``
adds our seconds per stage (prompts, prompt decoding, mask upsampling, NMS, painting) for each field.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PLATE = REPO.parent / "shared" / "data" / "bbbc039_plate_rowsAB.ome.zarr"


def fields(n: int, crop: int):
    """(name, image, label image) for n fields of the real plate, or synthetic fields."""
    if PLATE.exists():
        from pipeline_lib.io.ome_zarr import describe_store, open_field
        layout = describe_store(str(PLATE))
        for ref in layout.fields[:n]:
            img = open_field(str(PLATE), ref.path)
            x = np.asarray(img.level(0))[0]
            gt = np.asarray(open_field(str(PLATE), ref.path + "/labels/nuclei_gt").level(0))[0]
            if crop:
                x, gt = x[:crop, :crop], gt[:crop, :crop]
            yield ref.path, x, gt
    else:
        from pipeline_lib.io.synthetic import blob_field
        for k in range(n):
            x, gt = blob_field((crop or 520, crop or 696), n=120, seed=k)
            yield f"synthetic{k}", x, gt


def _timed(fn, dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, res


def _profile(pd, dev) -> dict:
    """Wrap our stages (module functions the APG path calls, and the decoder's ``decode``) in timers; returns
    the dict they add their seconds to (``decode`` excludes the upsampling, which ``decode_points`` calls)."""
    import pipeline_lib.embed.device_masks as dm
    import pipeline_lib.embed.prompt_decoder as pdm
    import pipeline_lib.instances.apg as apg

    split: dict = {}

    def wrap(key, fn):
        def timed(*a, **k):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            split[key] = split.get(key, 0.0) + time.perf_counter() - t0
            return out
        return timed

    apg.apg_points = wrap("prompts", apg.apg_points)
    pd.decode = wrap("decode", pd.decode)
    pdm.upsample_masks = wrap("upsample", pdm.upsample_masks)
    apg.mask_nms = wrap("nms", apg.mask_nms)
    apg.paint = wrap("paint", apg.paint)
    dm.mask_nms = wrap("nms", dm.mask_nms)  # the device path (candidates on a GPU)
    dm.paint = wrap("paint", dm.paint)
    return split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--crop", type=int, default=0, help="crop fields to crop x crop (0: whole field)")
    ap.add_argument("--batch-size", type=int, default=32, help="prompts per decoder batch (both sides)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=1, help="runs per field and side (alternating), best kept")
    ap.add_argument("--profile", action="store_true", help="print our seconds per stage for each field")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import micro_sam
        from micro_sam.instance_segmentation import AutomaticPromptGenerator
    except ImportError:
        sys.exit("micro-sam is not installed here: run `make bench-env` and use .venv-bench/bin/python")
    from segment_anything import SamPredictor

    from pipeline_lib.embed.oracle import oracle_maps
    from pipeline_lib.embed.preprocess import encoder_input, input_size, normalize_and_pad
    from pipeline_lib.embed.prompt_decoder import PromptDecoder, decode_points
    from pipeline_lib.embed.device_masks import assemble as device_assemble
    from pipeline_lib.instances.apg import apg_segment, assemble
    from pipeline_lib.measure.metrics import segmentation_scores
    from pipeline_lib.models.tiny import build_tiny
    from pipeline_lib.tiling import block_grid

    dev = torch.device(args.device)
    on_device = dev.type != "cpu"  # as the workflow: candidates stay on a GPU (torch NMS and painting)
    sam, decoder = build_tiny(0)
    sam, decoder = sam.to(dev), decoder.to(dev)
    pd = PromptDecoder(sam)
    split = _profile(pd, dev) if args.profile else None
    print(f"micro-sam {micro_sam.__version__}, torch {torch.__version__}, device {dev}, threads {args.threads}, "
          f"tiny random-weight model, decoder batch {args.batch_size}")
    print(f"{'field':>12} {'shape':>11} {'prompts':>7} {'objects':>7} {'micro-sam s':>11} {'ours s':>7} "
          f"{'ratio':>6} {'mSA':>6}")
    t_ms = t_ours = 0.0
    for name, img, gt in fields(args.fields, args.crop):
        with torch.no_grad():
            emb = sam.image_encoder(normalize_and_pad([encoder_input(img)], dev))
        maps = oracle_maps(gt)
        pred = SamPredictor(sam)
        pred.features, pred.original_size, pred.input_size = emb, img.shape, input_size(img.shape)
        pred.is_image_set = True
        ms = AutomaticPromptGenerator(pred, decoder)
        ms._foreground, ms._center_distances, ms._boundary_distances = maps
        ms._is_initialized = True
        blocks = block_grid(img.shape, max(img.shape))
        pd.set_tiles(emb)

        def run_ms(ms=ms):
            return ms.generate(batch_size=args.batch_size)

        def run_ours(blocks=blocks, shape=img.shape, maps=maps):
            return apg_segment(maps, max(shape), lambda tl, pts: (
                decode_points(pd, blocks, shape, tl, pts, batch_size=args.batch_size, on_device=on_device)),
                assemble=device_assemble if on_device else assemble)

        best_ms = best_ours = float("inf")
        for _ in range(max(1, args.repeats)):
            dt, seg_ms = _timed(run_ms, dev)
            best_ms = min(best_ms, dt)
            if split is not None:
                split.clear()
            dt, (seg, info) = _timed(run_ours, dev)
            if dt < best_ours:
                best_ours, stages = dt, dict(split or {})
        msa = segmentation_scores(seg_ms, seg)["msa"]
        t_ms += best_ms
        t_ours += best_ours
        print(f"{name:>12} {str(img.shape):>11} {info['n_prompts']:>7} {int(seg.max()):>7} {best_ms:>11.2f} "
              f"{best_ours:>7.2f} {best_ms / best_ours:>6.2f} {msa:>6.3f}", flush=True)
        if split is not None:
            print(f"{'':>12} ours: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
                  + f", other {best_ours - sum(stages.values()):.2f}", flush=True)
    print(f"total: micro-sam {t_ms:.2f} s, ours {t_ours:.2f} s, speed-up {t_ms / t_ours:.2f}x")


if __name__ == "__main__":
    main()
