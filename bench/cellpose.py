"""Cellpose-SAM network: our batched tiles (embed.cellpose_net) vs cellpose's own ``CellposeModel.eval``.

Same image, same weights (a random model in the cpsam file layout: tiny by default, ``--full`` for the
full ViT-L cpsam shape), in one run; best of ``--reps`` after a warm-up. Prints tiles/s and seconds per
field of the network step (cellpose: ``eval(..., compute_masks=False)``, its own normalisation, tiling and
overlap averaging; ours: field percentiles, inner regions, float16 output), then the masks of both flow
fields (cellpose's dynamics on each) and their agreement (mSA). Random weights give meaningless masks: the
agreement only shows how much the two tilings differ. ``--masks N``: instead, the flows -> masks step on
oracle flows (``label_flows`` of the ground truth plus noise) of N fields of the real plate: cellpose's
``compute_masks`` vs ``cellpose.exact`` (untiled and blockwise), s per Mpx on CPU and mSA against cellpose.
Usage::

    PYTHONPATH=. python bench/cellpose.py [--full] [--reps 3] [--device cpu] [--crop 240]
    PYTHONPATH=. python bench/cellpose.py --masks 4 [--reps 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# this file is named like the package it measures: keep bench/ off the path so `import cellpose` is cellpose
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from pipeline_lib.embed.cellpose_dynamics import cellpose_masks  # noqa: E402
from pipeline_lib.embed.cellpose_net import net_tiles, predict_field  # noqa: E402
from pipeline_lib.instances.flows import FlowParams  # noqa: E402
from pipeline_lib.measure.metrics import segmentation_scores  # noqa: E402
from pipeline_lib.models.cellpose import load_cellpose_net, write_tiny_cellpose  # noqa: E402

PLATE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "bbbc039_plate_rowsAB.ome.zarr"


def field(crop: int | None) -> tuple[np.ndarray, str]:
    if PLATE.exists():
        import zarr
        img = np.asarray(zarr.open_array(str(PLATE / "A/2/0/s0"), mode="r"))[0]
        name = "BBBC039 A/2 field 0"
    else:
        from pipeline_lib.io.synthetic import blob_field
        img, _ = blob_field((520, 696), 80, seed=0)
        name = "synthetic blobs"
    if crop:
        img = img[:crop, :crop]
    return img, f"{name} {img.shape[0]}x{img.shape[1]}"


def cellpose_model(net, path: str):
    """cellpose's CellposeModel around the same network object (its constructor only builds ViT-L)."""
    from cellpose.models import CellposeModel
    m = CellposeModel.__new__(CellposeModel)
    m.device, m.gpu, m.backbone, m.net, m.pretrained_model = net.device, net.device.type == "cuda", "sam_vitl", \
        net, path
    return m


def cellpose_tiles(shape: tuple[int, int]) -> int:
    from cellpose import transforms
    p = transforms.get_pad_yx(*shape, min_size=(256, 256))
    L = (shape[0] + p[0] + p[1], shape[1] + p[2] + p[3])
    return int(np.prod([1 if n <= 256 else int(np.ceil(1.2 * n / 256)) for n in L]))


def best(fn, reps: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def bench_masks(n_fields: int, reps: int, block: int = 256, halo: int = 128) -> None:
    """cellpose's compute_masks vs cellpose.exact on oracle flows (+ noise 0.5) of the real plate's fields."""
    import zarr

    from pipeline_lib.embed.cellpose_dynamics import label_flows, masks_blockwise
    g = zarr.open_group(str(PLATE), mode="r")
    keys = [f"{w['path']}/{im['path']}" for w in g.attrs["plate"]["wells"] for im in g[w["path"]].attrs["well"]["images"]]
    keys = keys[:: max(1, len(keys) // n_fields)][:n_fields]
    cp, ex = FlowParams(), FlowParams(exact=True)
    t = {"cellpose compute_masks": 0.0, "exact untiled": 0.0, f"exact blockwise {block}/{halo}": 0.0}
    msa, mpx = [], 0.0
    for k in keys:
        gt = np.asarray(g[f"{k}/labels/nuclei_gt/s0"])[0].astype(np.int64)
        flows = label_flows(gt) + np.random.default_rng(0).normal(0, 0.5, (3,) + gt.shape).astype(np.float32)
        out = np.zeros(gt.shape, np.uint32)
        dt, ref = best(lambda f=flows: cellpose_masks(f, cp), reps)
        t["cellpose compute_masks"] += dt
        dt, full = best(lambda f=flows: cellpose_masks(f, ex), reps)
        t["exact untiled"] += dt
        dt, _ = best(lambda f=flows, o=out: masks_blockwise(f, o, ex, block=block, halo=halo), reps)
        t[f"exact blockwise {block}/{halo}"] += dt
        pairs = np.unique(np.stack([out.ravel(), full.ravel()]), axis=1)  # identical up to the ids
        assert len(pairs[0]) == len(np.unique(pairs[0])) == len(np.unique(pairs[1])), k
        msa.append(segmentation_scores(full, ref)["msa"])
        mpx += gt.size / 1e6
    print(f"\nflows -> masks, {len(keys)} BBBC039 fields (oracle flows + noise 0.5), CPU, {torch.get_num_threads()} "
          f"threads, best of {reps}\n")
    print(f"| {'method':<32} | s / Mpx |")
    print(f"|{'-' * 34}|---------|")
    for name, sec in t.items():
        print(f"| {name:<32} | {sec / mpx:7.2f} |")
    print(f"\nmSA(exact untiled, cellpose compute_masks): mean {np.mean(msa):.4f}, min {np.min(msa):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="full cpsam shape (ViT-L, 305M parameters)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--crop", type=int, default=None, help="crop the field to crop x crop")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--halo", type=int, default=32)
    ap.add_argument("--masks", type=int, default=0, help="bench the flows -> masks step on N real fields instead")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(int(os.environ.get("BENCH_THREADS", 2)), os.cpu_count() or 1)))
    if args.masks:
        return bench_masks(args.masks, args.reps)
    img, name = field(args.crop)
    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(embed_dim=1024, depth=24, num_heads=16, neck_dim=256) if args.full else {}
        path = write_tiny_cellpose(tmp, seed=0, **kw)
        net = load_cellpose_net(path, device=args.device)
        model = cellpose_model(net, path)
        n_ours = len(net_tiles(img.shape, halo=args.halo))
        n_cp = cellpose_tiles(img.shape)
        t_ours, flows = best(lambda: predict_field(net, img, halo=args.halo, batch_size=args.batch_size),
                             args.reps)
        t_cp, res = best(lambda: model.eval(img, batch_size=args.batch_size, compute_masks=False), args.reps)
    cp_flows = np.concatenate([res[1][1], res[1][2][None]]).astype(np.float32)
    p = FlowParams()
    m_ours, m_cp = cellpose_masks(flows.astype(np.float32), p), cellpose_masks(cp_flows, p)
    agree = segmentation_scores(m_ours, m_cp)["msa"] if m_cp.max() or m_ours.max() else 1.0
    diff = float(np.abs(flows.astype(np.float32) - cp_flows).mean() / (np.abs(cp_flows).mean() + 1e-12))
    model_name = "cpsam shape (ViT-L, random)" if args.full else "tiny cpsam layout (random)"
    print(f"\nCellpose-SAM network, {model_name}, {name}, device {args.device}, "
          f"{torch.get_num_threads()} threads, batch {args.batch_size}, best of {args.reps}\n")
    print(f"| {'method':<38} | tiles | s / field | tiles / s | objects |")
    print(f"|{'-' * 40}|-------|-----------|-----------|---------|")
    print(f"| {'cellpose CellposeModel.eval (net)':<38} | {n_cp:5d} | {t_cp:9.3f} | {n_cp / t_cp:9.2f} | "
          f"{int(m_cp.max()):7d} |")
    print(f"| {f'ours predict_flows (halo {args.halo})':<38} | {n_ours:5d} | {t_ours:9.3f} | "
          f"{n_ours / t_ours:9.2f} | {int(m_ours.max()):7d} |")
    print(f"\nfield speed-up {t_cp / t_ours:.2f}x; flows mean |ours - cellpose| / mean |cellpose| = {diff:.3f}; "
          f"masks agreement mSA(ours, cellpose) = {agree:.3f}")


if __name__ == "__main__":
    main()
