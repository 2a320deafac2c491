"""Cellpose-SAM's mask step through the workflow on the whole real plate, from oracle flows.

Oracle flows: cellpose's ``masks_to_flows`` of ``labels/nuclei_gt`` of every field, scaled as its network
outputs them (``embed.cellpose_dynamics.write_oracle_flows``), stored as a ``flows`` predictions store.
The Snakefile then runs ``method: cellpose_sam`` with ``predictions:`` twice (no network: the CPU mask
step, measure, aggregate, report): *tiled* (``cellpose.mask_block`` 256, ``mask_halo`` 64: 6 blocks per
520 x 696 field) and *untiled* (one block per field: without ``--exact`` exactly cellpose's ``compute_masks`` on the whole
field, the ceiling of cellpose's dynamics on these flows). Printed: mSA / SA50 against nuclei_gt per well
and plate mean for both, and the mSA of tiled against untiled labels (min over fields).

    .venv/bin/python bench/cellpose_plate.py [--flow-threshold 0.4] [--exact] [--cores 2] [--work /tmp/cp_plate]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
import zarr

REPO = Path(__file__).resolve().parents[1]
# bench/cellpose.py would shadow the cellpose package: drop this folder from the path, add the repository
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))
PLATE = REPO.parent / "shared" / "data" / "bbbc039_plate_rowsAB.ome.zarr"


def run(cfg: dict, workdir: Path, cores: int) -> float:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                    str(workdir), "--configfile", str(workdir / "config.yaml"), "--cores", str(cores), "--quiet",
                    "rules"], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flow-threshold", type=float, default=0.4, help="cellpose's default 0.4; 0 = no flow QC")
    ap.add_argument("--exact", action="store_true", help="cellpose.exact: true (translation-invariant variant)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="keep the plate copy and oracle flows of an earlier run in --work")
    ap.add_argument("--work", default="/tmp/cp_plate")
    args = ap.parse_args()
    if not PLATE.exists():
        sys.exit(f"{PLATE} not present (../shared/data, see its README)")
    from pipeline_lib.embed.cellpose_dynamics import write_oracle_flows
    from pipeline_lib.measure.metrics import mean_segmentation_accuracy as msa
    work = Path(args.work)
    plate = work / "plate.ome.zarr"
    t0 = time.perf_counter()
    if args.reuse and (work / "flows.ome.zarr").exists():
        n = 0  # counted from the results below
        for name in ("tiled", "untiled"):
            shutil.rmtree(work / name, ignore_errors=True)
            shutil.rmtree(work / f"wd_{name}", ignore_errors=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(PLATE, plate)
        n = write_oracle_flows(str(plate), "nuclei_gt", str(work / "flows.ome.zarr"))
    t_flows = time.perf_counter() - t0
    walls, summaries = {}, {}
    for name, block in (("tiled", 256), ("untiled", 1024)):
        cfg = {"input": str(plate), "output": str(work / name), "method": "cellpose_sam",
               "predictions": str(work / "flows.ome.zarr"), "labels": {"name": name}, "ground_truth": "nuclei_gt",
               "cellpose": {"flow_threshold": args.flow_threshold, "mask_block": block, "mask_halo": 64,
                            "exact": args.exact}}
        walls[name] = run(cfg, work / f"wd_{name}", args.cores)
        summaries[name] = json.loads((work / name / "summary.json").read_text())
    rows = []
    for f in summaries["tiled"]["fields"]:
        lab = {k: np.asarray(zarr.open_array(f"{plate}/{f['path']}/labels/{k}/s0", mode="r"))
               for k in ("tiled", "untiled")}
        rows.append({"well": f["well"], "field": f["path"], "tiled_vs_untiled": msa(lab["tiled"], lab["untiled"])})
    agree = pd.DataFrame(rows)
    metrics = {k: pd.read_csv(work / k / "metrics.csv", dtype={"field": str}) for k in ("tiled", "untiled")}
    wells = {k: m[m["level"] == "well"].set_index("well") for k, m in metrics.items()}
    plate_row = {k: m[m["level"] == "plate"].iloc[0] for k, m in metrics.items()}
    n = len(agree)
    print(f"\n{n} fields; oracle flows {t_flows:.0f} s; workflow wall: tiled {walls['tiled']:.0f} s, "
          f"untiled {walls['untiled']:.0f} s (--cores {args.cores}); flow_threshold {args.flow_threshold}; "
          f"exact {args.exact}\n")
    print("| well | fields | mSA tiled | mSA untiled (= compute_masks) | SA50 tiled | tiled vs untiled (min field) |")
    print("|---|---|---|---|---|---|")
    for w in wells["tiled"].index:
        t, u = wells["tiled"].loc[w], wells["untiled"].loc[w]
        a = agree[agree["well"] == w]["tiled_vs_untiled"].min()
        print(f"| {w} | {int(t['n_fields'])} | {t['msa']:.4f} | {u['msa']:.4f} | {t['sa50']:.4f} | {a:.4f} |")
    t, u = plate_row["tiled"], plate_row["untiled"]
    print(f"| **plate** | {int(t['n_fields'])} | **{t['msa']:.4f}** | **{u['msa']:.4f}** | {t['sa50']:.4f} | "
          f"**{agree['tiled_vs_untiled'].min():.4f}** |")

if __name__ == "__main__":
    main()
