"""2D any-size benchmark: one large single 2D OME-Zarr image (not a plate) of synthetic nuclei, generated
lazily block by block on disk, segmented by the real workflow (``snakemake`` in a subprocess) at a base size
and at 4x (and 16x) the pixels.

Cases (issue 12 §4 (a)/(b)):
  ais  ``method: ais`` from oracle decoder maps (``embed/oracle.py``, written block by block as the
       ``predictions`` store): no model; segment = blockwise AIS, measure = blockwise features and mSA.
  apg  ``method: apg`` with the tiny random-weight model (``python -m pipeline_lib tiny-model``) on the CPU;
       fields larger than ``tiling.field_block`` go through ``steps/large_field.py``. The tiny model is
       untrained, so its accuracy is meaningless and not printed; this case measures time and memory.

Prints one table: case, size (px), objects, wall time of the workflow, Mpx/s, job count, and the peak RSS
(MB) of the largest job of every rule: the larger of Snakemake's ``benchmark:`` max_rss (predict, segment,
prompt_segment, measure; sampled only every 30 s after a job's first 15 s, so it can miss short peaks) and
the kernel's VmHWM of the spawned job processes (every rule; read every 0.2 s, so it misses at most the
last 0.2 s of a job). The point to show: peak RSS per job stays flat when the image
grows 4x (it is bounded by the block/tile, not the image).

    python bench/image2d.py --cases ais                                  # AIS 8192^2 and 16384^2
    python bench/image2d.py --cases ais --ais-size 2048 --grow 4 16        # AIS 2048^2, 4096^2, 8192^2
    python bench/image2d.py --cases apg --apg-size 512 --field-block 256 --field-halo 64 --grow 4 16
    python bench/image2d.py --ais-size 32768 --apg-size 8192 --field-block 4096 --grow 4 16   # the issue's
    python bench/image2d.py --cases ais --repeat 3  # run-to-run noise of the peak RSS

Run so far: see README ("Large 2D images" under Benchmarks) for the tables. History: before the memory
fixes of 2026-12-02 the APG prompt_segment job peaked at 2.8 GB (1k^2, field_block 512, encoder batch 8 on
the CPU): the global-attention bias and scores of the whole batch in one call (2.1 GB) and the instance
decoder's full-resolution activations of the whole batch (2.7 GB at once, ~300 MB per tile). Now the
attention is chunked over query rows (embed/encoder.py, 64 MB bias per call), the decoder runs in
sub-batches under 512 MiB (embed/predict.py), the prompt decoder computes a tile's layer-1 terms when its
prompts are decoded (4 tiles cached, not 4 extra copies of every embedding of a block), and encoded tiles
drop their input; measure writes each field's table at once and aggregate reads row group by row group.
The issue's sizes (32k^2 AIS, 8k^2 APG, 256 x 4096^2 volumes) and 16x were not run on the shared 2-core
machine (load 10-14 during these runs: a 512^2 APG run took 15 min of wall time, mostly job start-up).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
import zarr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline_lib.embed.oracle import oracle_maps  # noqa: E402
from pipeline_lib.io import ngff  # noqa: E402
from pipeline_lib.io.ngff import create_predictions_image  # noqa: E402
from pipeline_lib.io.synthetic_volume import _hash  # noqa: E402
from pipeline_lib.tiling import block_grid  # noqa: E402

CELL = 24  # one nucleus at most per CELL x CELL cell, inside it (diameters ~7..23 px)


def nuclei_2d(region: tuple[slice, slice], shape: tuple[int, int], cell: int = CELL, fill: float = 0.8,
              seed: int = 0) -> np.ndarray:
    """GT labels (uint32, id = cell index + 1) of ``region``: a rotated ellipse per occupied cell, a pure
    function of the cell index, so any block is generated without the rest of the image."""
    yy, xx = np.meshgrid(np.arange(region[0].start, region[0].stop), np.arange(region[1].start, region[1].stop),
                         indexing="ij")
    cy, cx = yy // cell, xx // cell
    lin = cy * (-(-shape[1] // cell)) + cx
    half = cell / 2
    r = [half * (0.3 + 0.6 * _hash(lin, seed * 7 + 2 + a)) for a in range(2)]
    rmax = np.maximum(r[0], r[1])
    slack = half - rmax  # the ellipse fits in its cell at any angle
    c0 = cy * cell + half - 0.5 + slack * (2 * _hash(lin, seed * 7 + 5) - 1)
    c1 = cx * cell + half - 0.5 + slack * (2 * _hash(lin, seed * 7 + 6) - 1)
    th = np.pi * _hash(lin, seed * 7 + 8)
    dy, dx = yy - c0, xx - c1
    u = (dy * np.cos(th) + dx * np.sin(th)) / r[0]
    v = (-dy * np.sin(th) + dx * np.cos(th)) / r[1]
    inside = (_hash(lin, seed * 7 + 1) < fill) & (u * u + v * v <= 1.0)
    return np.where(inside, lin + 1, 0).astype(np.uint32)


def _image(lab: np.ndarray, region: tuple[slice, slice], seed: int = 0) -> np.ndarray:
    """Nuclei of per-object brightness with multiplicative texture, background and pixel noise."""
    lin = lab.astype(np.int64)
    bright = np.where(lin > 0, 600 + 1400 * _hash(lin, seed * 7 + 11), 0)
    pos = (np.arange(region[0].start, region[0].stop)[:, None] << 24) + np.arange(region[1].start, region[1].stop)
    noise = _hash(pos, seed * 7 + 12) - 0.5
    return np.clip(200 + bright * (1 + 0.2 * noise) + 60 * noise, 0, 65535).astype(np.uint16)


def write_image2d(path: Path, size: int, predictions: Path | None, chunk: int = 512, block: int = 2048,
                  seed: int = 0, version: str = "0.4") -> dict:
    """A single-image OME-Zarr (c, y, x) of ``size`` x ``size`` with ``labels/nuclei_gt`` and (optionally)
    oracle decoder maps as a predictions store; memory bounded by ``block`` (plus one cell of margin for the
    per-object normalisation of the oracle maps). Levels halve down to <= 1024 px (strided picks)."""
    shape = (size, size)
    n_levels = max(1, int(np.ceil(np.log2(max(size / 1024, 1)))) + 1)
    fmt = ngff.zarr_format_of(version)
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    paths = [f"s{k}" for k in range(n_levels)]
    shapes = [tuple(-(-s // 2 ** k) for s in shape) for k in range(n_levels)]
    imgs = ngff.create_levels(root, paths, [(1,) + s for s in shapes], [(1, chunk, chunk)] * n_levels, "uint16", "cyx",
                              overwrite=True)
    lg = root.require_group("labels")
    ngff.write_labels_list(lg, ["nuclei_gt"], version)
    gt = lg.require_group("nuclei_gt")
    labs = ngff.create_levels(gt, paths, shapes, [(chunk, chunk)] * n_levels, "uint32", "yx", overwrite=True)
    units = {a: "micrometer" for a in "yx"}
    ds = lambda axes: ngff.datasets_meta(paths, [[1.0 if a == "c" else float(2 ** k) for a in axes]  # noqa: E731
                                                 for k in range(n_levels)])
    ngff.write_label(gt, version, ngff.axes_meta("yx", units), ds("yx"), "nuclei_gt")
    ngff.write_image(root, version, ngff.axes_meta("cyx", units), ds("cyx"), "synthetic_nuclei_2d",
                     omero=ngff.omero_meta(["DAPI"], ["FFFFFF"], [{"start": 0, "end": 2500, "min": 0, "max": 65535}]),
                     downsampling=ngff.NEAREST)
    maps = None
    if predictions is not None:
        maps = create_predictions_image(zarr.open_group(str(predictions), mode="w", zarr_format=fmt), shape,
                                        (chunk, chunk), version)
    n_obj = 0
    for b in block_grid(shape, block):
        lab = nuclei_2d(b.inner, shape, seed=seed)
        n_obj += len(np.unique(lab)) - 1
        img = _image(lab, b.inner, seed)
        for k in range(n_levels):
            f = 2 ** k  # block starts are multiples of 2^k for k <= log2(block)
            sub = tuple(slice(r.start // f, -(-r.stop // f)) for r in b.inner)
            imgs[k][(0,) + sub] = img[::f, ::f]
            labs[k][sub] = lab[::f, ::f]
        if maps is not None:
            outer = tuple(slice(max(r.start - CELL, 0), min(r.stop + CELL, n)) for r, n in zip(b.inner, shape))
            inner = tuple(slice(r.start - o.start, r.stop - o.start) for r, o in zip(b.inner, outer))
            maps[(slice(None),) + b.inner] = oracle_maps(nuclei_2d(outer, shape, seed=seed))[(slice(None),) + inner]
    return {"n_gt": n_obj, "n_levels": n_levels}


class HwmSampler:
    """Peak RSS (VmHWM, MB) per rule of the job processes Snakemake spawns (``--target-jobs 'rule:...'``)."""

    def __init__(self, root_pid: int, period: float = 0.2):
        self.root, self.period, self.peak = root_pid, period, {}
        self.jobs: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _children(self) -> dict[int, list[int]]:
        kids: dict[int, list[int]] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                kids.setdefault(ppid, []).append(int(d))
        return kids

    def _loop(self) -> None:
        while not self._stop.is_set():
            kids, todo = self._children(), [self.root]
            while todo:
                pid = todo.pop()
                todo.extend(kids.get(pid, []))
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    hwm = next(int(line.split()[1]) / 1024 for line in Path(f"/proc/{pid}/status").read_text()
                               .splitlines() if line.startswith("VmHWM"))
                except (OSError, StopIteration):
                    continue
                if b"--target-jobs" in cmd:
                    rule = cmd[cmd.index(b"--target-jobs") + 1].decode().strip("'").split(":")[0]
                    self.jobs[pid] = (rule, max(hwm, self.jobs.get(pid, ("", 0.0))[1]))
            self._stop.wait(self.period)

    def peaks(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for rule, mb in self.jobs.values():
            out[rule] = max(out.get(rule, 0.0), mb)
        return out


def run_case(case: str, size: int, args, work: Path, tiny: dict | None) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pred = work / "pred.ome.zarr" if case == "ais" else None
    info = write_image2d(work / "img.ome.zarr", size, pred, chunk=args.tile, block=args.gen_block)
    t_gen = time.time() - t0
    cfg = {"input": str(work / "img.ome.zarr"), "output": str(work / "out"), "method": case,
           "tiling": {"tile": args.tile, "halo": args.halo, "field_block": args.field_block,
                      "field_halo": args.field_halo},
           "ground_truth": "nuclei_gt"}
    if case == "ais":
        cfg["predictions"] = str(pred)
    else:
        cfg["model"] = {"checkpoint": tiny["checkpoint"], "decoder": tiny["decoder"], "device": "cpu"}
        if args.encoder_batch:
            cfg["encoder"] = {"batch_size": args.encoder_batch}
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
        raise SystemExit(f"workflow failed ({case} {size}):\n{(work / 'snakemake.log').read_text()[-4000:]}")
    peaks, n_jobs = sampler.peaks(), {}
    for line in (work / "snakemake.log").read_text().splitlines():  # forked workers share a job's cmdline
        if line.startswith("Finished jobid") and "(Rule: all)" not in line:
            rule = line.split("(Rule: ")[1].rstrip(")")
            n_jobs[rule] = n_jobs.get(rule, 0) + 1
    hwm, bench = dict(peaks), {}
    for tsv in glob.glob(str(work / "out" / "benchmarks" / "**" / "*.tsv"), recursive=True):
        p = Path(tsv)
        rule = p.parent.name if p.parent.name != "benchmarks" else p.stem
        bench[rule] = max(bench.get(rule, 0.0), float(pd.read_csv(tsv, sep="\t")["max_rss"].max()))
    # Snakemake samples a job's RSS (process tree) every 30 s after its first 15 s, so it can miss short
    # peaks; VmHWM is the kernel's exact per-process peak. The table shows the larger of the two.
    peaks = {k: max(hwm.get(k, 0.0), bench.get(k, 0.0)) for k in set(hwm) | set(bench)}
    summary = json.loads((work / "out" / "summary.json").read_text())
    res = {"case": case, "size": size, "px": size * size, "gen_s": t_gen, "run_s": t_run, "n_gt": info["n_gt"],
           "n_objects": summary.get("n_objects"), "n_jobs": sum(n_jobs.values()), "jobs": n_jobs,
           "peak_rss_mb": peaks, "hwm_mb": hwm, "benchmark_max_rss_mb": bench}
    metrics = work / "out" / "metrics.csv"
    if case == "ais" and metrics.exists():
        m = pd.read_csv(metrics)
        res["msa"] = float(m["msa"].iloc[0]) if "msa" in m else None
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return res


def _short(rule: str) -> str:
    return {"prompt_segment": "pseg", "check_complete": "check", "aggregate": "aggr"}.get(rule, rule)


def print_table(rows: list[dict], args) -> None:
    rules = sorted({k for r in rows for k in r["peak_rss_mb"]})
    print(f"\n2D single image, real workflow, tile {args.tile}, halo {args.halo}, field_block {args.field_block}, "
          f"field_halo {args.field_halo}, "
          f"{args.cores} cores (wall time = workflow only; generation not included)")
    head = f"{'case':>4} {'size (px)':>13} {'objects':>9} {'wall s':>7} {'Mpx/s':>6} {'jobs':>4} " + \
        " ".join(f"{_short(r):>8}" for r in rules) + f" {'mSA':>6}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        rss = " ".join(f"{r['peak_rss_mb'].get(k, float('nan')):>8.0f}" for k in rules)
        msa = f"{r['msa']:>6.3f}" if r.get("msa") is not None else f"{'-':>6}"
        print(f"{r['case']:>4} {str(r['size']) + 'x' + str(r['size']):>13} {r['n_objects'] or 0:>9d} "
              f"{r['run_s']:>7.1f} {r['px'] / r['run_s'] / 1e6:>6.2f} {r['n_jobs']:>4d} {rss} {msa}")
    print("peak RSS in MB of the largest job of each rule; mSA vs the synthetic GT (AIS only: the tiny model is "
          "untrained)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["ais", "apg"], choices=["ais", "apg"])
    ap.add_argument("--ais-size", type=int, default=8192, help="base side (px) for AIS; the issue's: 32768")
    ap.add_argument("--apg-size", type=int, default=4096, help="base side (px) for APG; the issue's: 8192")
    ap.add_argument("--grow", type=int, nargs="*", default=[4], help="also run these pixel factors (4, 16)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per size (run-to-run noise of the peak RSS)")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--halo", type=int, default=64)
    ap.add_argument("--field-block", type=int, default=2048, help="tiling.field_block (APG blocks)")
    ap.add_argument("--field-halo", type=int, default=256, help="tiling.field_halo (>= the largest object, 23 px)")
    ap.add_argument("--encoder-batch", type=int, default=None, help="encoder.batch_size for APG (default: schema's)")
    ap.add_argument("--gen-block", type=int, default=2048, help="generation block (px)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep each run's data (default: deleted after the run)")
    ap.add_argument("--workdir", default=None, help="put the data here (default: a temporary directory)")
    args = ap.parse_args()
    rows = []
    tmp = tempfile.mkdtemp(dir=args.workdir, prefix="image2d.")
    try:
        tiny = None
        if "apg" in args.cases:
            subprocess.run([sys.executable, "-m", "pipeline_lib", "tiny-model", f"{tmp}/tiny"], check=True,
                           capture_output=True)
            tiny = {"checkpoint": f"{tmp}/tiny/sam.pt", "decoder": f"{tmp}/tiny/decoder.pt"}
        for case in args.cases:
            base = args.ais_size if case == "ais" else args.apg_size
            for g in [1] + list(args.grow):
                size = int(round(base * np.sqrt(g)))
                for rep in range(args.repeat):
                    r = run_case(case, size, args, Path(tmp) / f"{case}{size}_{rep}", tiny)
                    rows.append(r)
                    print(json.dumps(r, default=float), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print_table(rows, args)


if __name__ == "__main__":
    main()
