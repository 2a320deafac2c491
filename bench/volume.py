"""Volume scaling benchmark: a synthetic nucleus volume (generated lazily on disk) with per-slice oracle
decoder maps, segmented by the real workflow from those maps (AIS, no model), at a base size and at 4x.

Prints, per size: generation time, workflow wall time, voxels per second, jobs (per rule and in all), the
peak memory (the larger of Snakemake's ``benchmark:`` max_rss and the jobs' exact VmHWM, as in bench/image2d.py) of
the largest job of each rule, and the accuracy
against the synthetic GT. Peak memory per job should stay the same when the volume grows: it is bounded by
the block and ``volume.blocks_per_job`` (give a small ``--blocks-per-job`` so that the small sizes have
several jobs per rule, as the large ones do at the default).

    python bench/volume.py                                # 64 x 1024 x 1024 and 64 x 2048 x 2048
    python bench/volume.py --shape 256 4096 4096          # the issue's sizes (and 4x: 256 x 8192 x 8192)
"""
from __future__ import annotations

import argparse
import glob
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
import zarr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline_lib.io.synthetic_volume import write_synthetic_volume  # noqa: E402
from pipeline_lib.measure.metrics import segmentation_scores  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from image2d import HwmSampler  # noqa: E402


def run_size(shape, args, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    info = write_synthetic_volume(work / "vol.ome.zarr", shape=shape, predictions=str(work / "pred.ome.zarr"),
                                  chunk=args.tile, block=(args.z_block, 1024, 1024))
    t_gen = time.time() - t0
    cfg = {"input": str(work / "vol.ome.zarr"), "output": str(work / "out"), "predictions": str(work / "pred.ome.zarr"),
           "tiling": {"tile": args.tile, "halo": args.halo}, "volume": {"z_block": args.z_block}}
    if args.blocks_per_job:
        cfg["volume"]["blocks_per_job"] = args.blocks_per_job
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(work / "config.yaml"), "--cores", str(args.cores), "--quiet", "rules"]
    t0 = time.time()
    with open(work / "snakemake.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        with HwmSampler(proc.pid) as sampler:
            rc = proc.wait()
    t_run = time.time() - t0
    if rc != 0:
        raise SystemExit(f"workflow failed:\n{(work / 'snakemake.log').read_text()[-4000:]}")
    peaks, jobs = dict(sampler.peaks()), {}  # exact VmHWM of every job process (see bench/image2d.py)
    for tsv in glob.glob(str(work / "out" / "benchmarks" / "**" / "*.tsv"), recursive=True):
        rule = Path(tsv).parent.name if Path(tsv).parent.name != "benchmarks" else Path(tsv).stem
        rss = float(pd.read_csv(tsv, sep="\t")["max_rss"].max())
        peaks[rule] = max(peaks.get(rule, 0.0), rss)
        jobs[rule] = jobs.get(rule, 0) + 1
    summary = json.loads((work / "out" / "summary.json").read_text())
    res = {"shape": shape, "voxels": int(np.prod(shape)), "n_cells": info["n_cells"], "gen_s": t_gen,
           "run_s": t_run, "n_objects": summary["n_objects"], "n_blocks": summary["grid"]["n_blocks"],
           "merge": summary["merge"], "peak_rss_mb": peaks,
           "jobs": jobs}
    if args.accuracy:
        z = min(shape[0], 32)  # a sub-volume is enough for the accuracy figure (and bounded in memory)
        y = min(shape[1], 1024)
        lab = zarr.open_array(str(work / "vol.ome.zarr" / "labels" / "sam" / "s0"), mode="r")[:z, :y, :y]
        gt = zarr.open_array(str(work / "vol.ome.zarr" / "labels" / "nuclei_gt" / "s0"), mode="r")[:z, :y, :y]
        res["msa_subvolume"] = segmentation_scores(lab, gt)["msa"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[64, 1024, 1024])
    ap.add_argument("--grow", type=int, nargs="*", default=[4], help="also run volumes this many times larger (yx)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per size (run-to-run noise of the peak RSS)")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--halo", type=int, default=64)
    ap.add_argument("--z-block", type=int, default=16)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--blocks-per-job", type=int, default=None, help="volume.blocks_per_job (default: schema)")
    ap.add_argument("--no-accuracy", dest="accuracy", action="store_false")
    ap.add_argument("--workdir", default=None, help="keep the data here (default: a temporary directory)")
    args = ap.parse_args()
    shapes = [tuple(args.shape)]
    for g in args.grow:
        f = int(round(np.sqrt(g)))
        shapes.append((args.shape[0], args.shape[1] * f, args.shape[2] * f))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rows = []
        for shape in shapes:
            for rep in range(args.repeat):
                r = run_size(shape, args, Path(tmp) / ("x".join(map(str, shape)) + f"_{rep}"))
                rows.append(r)
                print(json.dumps(r, default=float), flush=True)
                shutil.rmtree(Path(tmp) / ("x".join(map(str, shape)) + f"_{rep}"), ignore_errors=True)
    print(f"\nvolume workflow from oracle maps (AIS), tile {args.tile}, halo {args.halo}, z_block {args.z_block}, "
          f"{args.cores} cores")
    print(f"{'shape':>18} {'voxels':>12} {'objects':>8} {'blocks':>6} {'jobs':>5} {'gen s':>7} {'run s':>7} "
          f"{'Mvox/s':>7} {'peak MB (rule)':>40}")
    for r in rows:
        worst = max(r["peak_rss_mb"], key=r["peak_rss_mb"].get)
        per = ", ".join(f"{k.replace('volume_', '')} {v:.0f} MB ({r['jobs'][k]} jobs)"
                        for k, v in sorted(r["peak_rss_mb"].items()))
        print(f"{'x'.join(map(str, r['shape'])):>18} {r['voxels']:>12d} {r['n_objects']:>8d} {r['n_blocks']:>6d} "
              f"{sum(r['jobs'].values()):>5d} {r['gen_s']:>7.1f} {r['run_s']:>7.1f} {r['voxels'] / r['run_s'] / 1e6:>7.2f} "
              f"  max {r['peak_rss_mb'][worst]:.0f} ({worst}); {per}")
        if "msa_subvolume" in r:
            print(f"{'':>18} mSA vs GT (first 32 x 1024 x 1024): {r['msa_subvolume']:.3f}")


if __name__ == "__main__":
    main()
