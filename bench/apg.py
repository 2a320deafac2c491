"""Time our APG against micro-sam's AutomaticPromptGenerator on the same weights, image and decoder maps.

Both sides get the same image embedding (our encoder; its input is tested bit-for-bit against micro-sam's)
and the same decoder maps, so only the APG stage is timed: prompts, prompt decoding, NMS, painting.
The model is the tiny random-weight one (no download); the maps are oracle maps from the ground truth of
the real plate in ../shared/data (or from synthetic blobs when it is absent), so the prompts are realistic.

Needs micro-sam 1.8.14 in the environment (`make bench-env`, then `.venv-bench/bin/python bench/apg.py`).

    python bench/apg.py [--fields 4] [--threads 2] [--crop 0] [--device cpu]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--crop", type=int, default=0, help="crop fields to crop x crop (0: whole field)")
    ap.add_argument("--batch-size", type=int, default=32, help="prompts per decoder batch (both sides)")
    ap.add_argument("--device", default="cpu")
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
    from pipeline_lib.instances.apg import apg_segment
    from pipeline_lib.measure.metrics import segmentation_scores
    from pipeline_lib.models.tiny import build_tiny
    from pipeline_lib.tiling import block_grid

    dev = torch.device(args.device)
    sam, decoder = build_tiny(0)
    sam, decoder = sam.to(dev), decoder.to(dev)
    pd = PromptDecoder(sam)
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
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        seg_ms = ms.generate(batch_size=args.batch_size)
        t1 = time.perf_counter()
        blocks = block_grid(img.shape, max(img.shape))
        pd.set_tiles(emb)
        seg, info = apg_segment(maps, max(img.shape), lambda tl, pts, pd=pd, blocks=blocks, shape=img.shape: (
            decode_points(pd, blocks, shape, tl, pts, batch_size=args.batch_size)))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        msa = segmentation_scores(seg_ms, seg)["msa"]
        t_ms += t1 - t0
        t_ours += t2 - t1
        print(f"{name:>12} {str(img.shape):>11} {info['n_prompts']:>7} {int(seg.max()):>7} {t1 - t0:>11.2f} "
              f"{t2 - t1:>7.2f} {(t1 - t0) / (t2 - t1):>6.2f} {msa:>6.3f}")
    print(f"total: micro-sam {t_ms:.2f} s, ours {t_ours:.2f} s, speed-up {t_ms / t_ours:.2f}x")


if __name__ == "__main__":
    main()
