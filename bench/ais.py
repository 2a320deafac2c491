"""Time our AIS post-processing (``ais_blockwise``) against micro-sam's on the same decoder maps.

The maps are oracle maps (``embed/oracle.py``) of a 2048 x 2048 mosaic of real DSB 2018 nuclei
(../shared/data/dsb2018_fluo_subset50; synthetic blobs when it is absent). micro-sam's side is
``InstanceSegmentationWithDecoder.generate`` with the maps injected (tiled: ``tile_shape``/``halo``/``n_threads``,
its block-parallel path); ours is ``ais_blockwise`` with the same block, halo and thread count ("ours same"),
and at our default post-processing block ``ais.block`` ("ours default": the maps are stitched before AIS
runs, so the pipeline post-processes in that block whatever the network tiling). Each row is
the best of ``--repeats`` runs after one warm-up, the two sides alternating, reported in seconds per
megapixel, with the agreement of the two label images (identical, or their mSA). micro-sam 1.8.14 is only
importable in the benchmark environment (``make bench-env``, or the ``.venv`` of ``make install``, which has micro-sam); without it
only our column is printed.

    python bench/ais.py [--size 2048] [--threads N] [--repeats 3] [--profile]

``--profile`` adds our wall time per stage (``timings`` of ``ais_blockwise``, best run) below the table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DSB = REPO.parent / "shared" / "data" / "dsb2018_fluo_subset50"
CELL = 256


def dsb_mosaic(size: int) -> tuple[np.ndarray, str]:
    """(size x size label mosaic, source): 256 x 256 crops of the DSB label images on a grid, ids offset."""
    cells = -(-size // CELL)
    out = np.zeros((cells * CELL, cells * CELL), np.int64)
    if not DSB.exists():
        from pipeline_lib.io.synthetic import blob_field
        _, lab = blob_field((size, size), n=size * size // 900, seed=0)
        return lab.astype(np.int64), "synthetic blobs"
    import tifffile
    meta = json.loads((DSB / "metadata.json").read_text())
    offset = 0
    for k in range(cells * cells):
        m = meta[k % len(meta)]
        lab = tifffile.imread(DSB / "labels" / f"{m['id']}.tif").astype(np.int64)
        # second use of an image: its opposite corner
        y0 = 0 if (k // len(meta)) % 2 == 0 else lab.shape[0] - CELL
        x0 = 0 if (k // len(meta)) % 2 == 0 else lab.shape[1] - CELL
        crop = lab[y0:y0 + CELL, x0:x0 + CELL]
        _, crop = np.unique(crop, return_inverse=True)  # consecutive, 0 stays 0 (always present)
        crop = crop.reshape(CELL, CELL)
        cy, cx = divmod(k, cells)
        out[cy * CELL:(cy + 1) * CELL, cx * CELL:(cx + 1) * CELL] = np.where(crop > 0, crop + offset, 0)
        offset += int(crop.max())
    return out[:size, :size], f"DSB 2018 ({len(meta)} images, {CELL} px crops)"


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of the process, all threads, result) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    res = fn()
    return time.perf_counter() - t0, time.process_time() - c0, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="print our time per stage (s per megapixel)")
    args = ap.parse_args()
    from pipeline_lib.embed.oracle import oracle_maps
    from pipeline_lib.instances.ais import AISParams, ais_blockwise
    from pipeline_lib.measure.metrics import mean_segmentation_accuracy as msa

    try:
        import micro_sam
        from micro_sam.instance_segmentation import InstanceSegmentationWithDecoder
    except ImportError:
        micro_sam = None
    gt, source = dsb_mosaic(args.size)
    maps = oracle_maps(gt)
    mp = gt.size / 1e6
    p = AISParams()
    print(f"{source}: {gt.shape[0]} x {gt.shape[1]}, {len(np.unique(gt)) - 1} nuclei; threads {args.threads}; "
          f"micro-sam {micro_sam.__version__ if micro_sam else 'not installed (column skipped)'}; "
          f"best of {args.repeats} after a warm-up, sides alternating")

    from pipeline_lib.config import validate_config
    cfg = validate_config({"input": "-", "output": "-"})  # the schema defaults
    default_block, default_halo = cfg["ais"]["block"], cfg["tiling"]["halo"]
    splits = {}

    def ours(tile, halo):
        out = np.zeros(gt.shape, np.uint32)
        t0 = time.perf_counter()
        res = ais_blockwise(maps, out, p, block=tile or max(gt.shape), halo=halo or 0, threads=args.threads)
        key = (tile, halo)
        if time.perf_counter() - t0 < splits.get(key, (float("inf"),))[0]:
            splits[key] = (time.perf_counter() - t0, res["timings"])
        return out

    def theirs(tile, halo):
        seg = InstanceSegmentationWithDecoder(None, None)
        # fresh copies: micro-sam's tiled path may smooth the maps it is given in place
        seg._foreground, seg._center_distances, seg._boundary_distances = (m.copy() for m in maps)
        seg._is_initialized = True
        kw = {"tile_shape": (tile, tile), "halo": (halo, halo), "n_threads": args.threads} if tile else {}
        return seg.generate(min_size=p.min_size, **kw)

    # (row, micro-sam's tile/halo, ours at our default block: ais.block with the row's halo, the untiled row
    # with the schema's tiling.halo, as the pipeline runs a field whatever its network tiling)
    rows = [("tiled 512/64", 512, 64, 64), ("tiled 128/32", 128, 32, 32), ("untiled", None, None, default_halo)]
    results, cpu = {}, {}
    print("same = ours at micro-sam's block and halo (untiled: one block); "
          f"default = ours at our default block ais.block {default_block} with the row's tiling.halo "
          f"(untiled row: {default_halo}), as the pipeline runs it")
    print(f"{'s per megapixel':>16} {'micro-sam':>10} {'ours same':>10} {'speed-up':>8} "
          f"{'ours default':>13} {'speed-up':>8}  agreement (ours same, ours default vs micro-sam)")

    def agreement(a, b):
        a, b = np.asarray(a).astype(np.int64), np.asarray(b).astype(np.int64)
        return "identical" if np.array_equal(a, b) else f"mSA {msa(a, b):.4f}"

    for name, tile, halo, dhalo in rows:
        sides = {"ours same": lambda t=tile, h=halo: ours(t, h),
                 "ours default": lambda h=dhalo: ours(default_block, h)}
        if micro_sam:
            sides["micro-sam"] = lambda t=tile, h=halo: theirs(t, h)
        for fn in sides.values():
            fn()  # warm-up
        best = {s: float("inf") for s in sides}
        res = {}
        for _ in range(args.repeats):  # alternate the sides, keep each side's best
            for s, fn in sides.items():
                t, c, res[s] = timed(fn)
                best[s] = min(best[s], t)
                cpu[name, s] = min(cpu.get((name, s), float("inf")), c)
        results[name] = res
        ms = f"{best['micro-sam'] / mp:>10.3f}" if micro_sam else f"{'-':>10}"

        def ratio(s, best=best):
            return f"{best['micro-sam'] / best[s]:>7.2f}x" if micro_sam else f"{'-':>8}"

        agree = (f"{agreement(res['ours same'], res['micro-sam'])}, "
                 f"{agreement(res['ours default'], res['micro-sam'])}") if micro_sam else ""
        print(f"{name:>16} {ms} {best['ours same'] / mp:>10.3f} {ratio('ours same')} "
              f"{best['ours default'] / mp:>13.3f} {ratio('ours default')}  {agree}", flush=True)
    full = results["untiled"]["ours same"]
    for name, tile, halo, dhalo in rows:
        print(f"{name}: ours same vs ours untiled {agreement(results[name]['ours same'], full)}, "
              f"ours default vs ours untiled {agreement(results[name]['ours default'], full)}", end="")
        if micro_sam and tile:
            print(f"; micro-sam {name} vs micro-sam untiled "
                  f"{agreement(results[name]['micro-sam'], results['untiled']['micro-sam'])}", end="")
        print()
    print(f"mSA against the ground truth: ours untiled {msa(full, gt):.4f}")
    # on a shared machine the wall ratio depends on how many cores each side got; the CPU time does not
    print("CPU seconds per megapixel (all threads, best run): "
          + "; ".join(f"{name}: " + ", ".join(f"{s} {cpu[name, s] / mp:.3f}" for s in ("micro-sam", "ours same",
                                                                                     "ours default")
                                              if (name, s) in cpu) for name, *_ in rows))
    if args.profile:
        print("ours per stage, s per megapixel (best run):")
        for name, tile, halo, dhalo in rows:
            for label, key in (("same", (tile, halo)), (f"default {default_block}/{dhalo}", (default_block, dhalo))):
                print(f"{name + ' ' + label:>28} "
                      + ", ".join(f"{k} {v / mp:.3f}" for k, v in splits[key][1].items()))


if __name__ == "__main__":
    main()
