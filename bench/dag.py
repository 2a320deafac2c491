"""DAG scale benchmark: Snakemake's job graph for a full 384-well x 9-field plate (metadata only, no pixels).

Writes a synthetic NGFF 0.4 / zarr v2 plate of 16 rows (A..P) x 24 columns x 9 fields, each field a
1-channel 2160 x 2160 uint16 image with a pyramid, whose arrays exist but hold no chunks (only metadata
is written, so the plate takes seconds and a few MB). A tiny random-weight model stands in for the
published one (no network). Then, per method:

1. ``snakemake --until plan`` runs the ``model`` rule and the ``plan`` checkpoint (which opens every
   field's metadata); the DAG beyond the checkpoint is only known once plan.json exists;
2. ``snakemake --dry-run`` builds the full job graph; its wall clock (Snakemake start-up included) and the
   job counts of its "Job stats" table are reported, total and per rule, with the cluster jobs (total minus
   the local rules declared with ``localrules:`` in workflow/rules/*.smk and the action-less target ``all``).

Prints a table: method, fields, batches, jobs (total, cluster, per rule), plan seconds, dry-run seconds.
The issue's target: the dry run under 30 s and at most a few hundred jobs with the default batching.

``--volume Z Y X`` does the same for a metadata-only volume (AIS from metadata-only predictions, 512 x 512
tiles unless ``--tile``): jobs per volume rule at the default ``volume.blocks_per_job`` (or the given ones).

    python bench/dag.py                            # ais and apg, default batching (schema default)
    python bench/dag.py --fields-per-job 16 32     # override batching.fields_per_job (one row each)
    python bench/dag.py --methods apg --keep       # keep the temporary directory (plate, configs, outputs)
    python bench/dag.py --volume 10000 10000 10000 # a 10k^3 volume (metadata only), default blocks_per_job
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
import zarr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline_lib.io import ngff  # noqa: E402

ROWS = "ABCDEFGHIJKLMNOP"


def write_metadata_plate(path: Path, rows: str = ROWS, columns: int = 24, fields: int = 9, side: int = 2160,
                         levels: int = 3, chunk: int = 1024, version: str = "0.4") -> int:
    """An HCS plate whose image arrays are created empty (fill_value 0, no chunk written); returns the field count.

    Same layout and metadata as ``pipeline_lib.io.synthetic.write_synthetic_plate`` (plate -> well -> field
    image groups with multiscales and omero metadata), without pixels.
    """
    root = zarr.open_group(str(path), mode="w", zarr_format=ngff.zarr_format_of(version))
    paths = [f"s{lvl}" for lvl in range(levels)]
    shapes = [(1, -(-side // 2 ** lvl), -(-side // 2 ** lvl)) for lvl in range(levels)]
    datasets = ngff.datasets_meta(paths, [[1.0, 2.0 ** lvl, 2.0 ** lvl] for lvl in range(levels)])
    omero = ngff.omero_meta(["DAPI"], ["FFFFFF"], [{"start": 0, "end": 4000, "min": 0, "max": 65535}])
    wells, n = [], 0
    for ri, r in enumerate(rows):
        for ci in range(columns):
            wpath = f"{r}/{ci + 1}"
            wells.append({"path": wpath, "rowIndex": ri, "columnIndex": ci})
            well = root.require_group(wpath)
            ngff.write_well(well, [str(i) for i in range(fields)], version)
            for i in range(fields):
                fg = well.require_group(str(i))
                ngff.create_levels(fg, paths, shapes, [(1, chunk, chunk)] * levels, "uint16", "cyx", overwrite=True)
                ngff.write_image(fg, version, ngff.axes_meta("cyx"), datasets, "image", omero=omero,
                                 downsampling=ngff.NEAREST, check=n == 0)
                n += 1
    ngff.write_plate(root, {"name": path.name, "rows": [{"name": r} for r in rows],
                            "columns": [{"name": str(c + 1)} for c in range(columns)], "wells": wells,
                            "field_count": fields}, version)
    return n


def write_metadata_volume(path: Path, shape: tuple[int, int, int], levels: int = 5, chunk: int = 512,
                          version: str = "0.4") -> Path:
    """A czyx uint16 volume and its (3, z, y, x) float16 predictions store, metadata only (no chunks)."""
    from pipeline_lib.io.volume import create_volume_maps
    root = zarr.open_group(str(path / "vol.ome.zarr"), mode="w", zarr_format=ngff.zarr_format_of(version))
    paths = [f"s{lvl}" for lvl in range(levels)]
    shapes = [(1, shape[0], -(-shape[1] // 2 ** lvl), -(-shape[2] // 2 ** lvl)) for lvl in range(levels)]
    ngff.create_levels(root, paths, shapes, [(1, 1, chunk, chunk)] * levels, "uint16", "czyx", overwrite=True)
    datasets = ngff.datasets_meta(paths, [[1.0, 1.0, 2.0 ** lvl, 2.0 ** lvl] for lvl in range(levels)])
    ngff.write_image(root, version, ngff.axes_meta("czyx"), datasets, "volume", downsampling=ngff.NEAREST)
    create_volume_maps(zarr.open_group(str(path / "pred.ome.zarr"), mode="w",
                                       zarr_format=ngff.zarr_format_of(version)), shape, (chunk, chunk), version)
    return path


def run_volume(shape: tuple[int, int, int], bpj: int | None, tile: int, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    write_metadata_volume(work, shape, chunk=tile)
    cfg = {"input": str(work / "vol.ome.zarr"), "output": str(work / "out"), "predictions": str(work / "pred.ome.zarr"),
           "method": "ais", "tiling": {"tile": tile}}
    if bpj is not None:
        cfg["volume"] = {"blocks_per_job": bpj}
    plan, stats = plan_and_count(work, cfg)
    return {"shape": shape, "blocks_per_job": bpj, "blocks": plan["n_slabs"] * plan["n_tiles"],
            "batches": len(plan["batches"]), **stats}


def volume_main(args: argparse.Namespace, tmp: Path) -> None:
    default = yaml.safe_load((REPO / "pipeline_lib" / "config.schema.yaml").read_text())[
        "properties"]["volume"]["properties"]["blocks_per_job"]["default"]
    shape = tuple(args.volume)
    print(f"volume {' x '.join(map(str, shape))} (metadata only), tile {args.tile}, "
          f"default volume.blocks_per_job (schema): {default}")
    head = f"{'blocks/job':>11}{'blocks':>9}{'batches':>9}{'jobs':>6}{'cluster':>9}{'plan s':>8}{'dry-run s':>11}" \
           "  jobs per rule"
    rows = [run_volume(shape, b, args.tile, tmp / f"vol_{b or 'default'}") for b in args.blocks_per_job or [None]]
    print(head)
    print("-" * len(head))
    for r in rows:
        bpj = r["blocks_per_job"] if r["blocks_per_job"] is not None else f"{default}*"
        rules = ", ".join(f"{k} {v}" for k, v in r["per_rule"].items())
        print(f"{bpj!s:>11}{r['blocks']:>9}{r['batches']:>9}{r['jobs']:>6}{r['cluster_jobs']:>9}{r['plan_s']:>8.1f}"
              f"{r['dry_run_s']:>11.1f}  {rules}")


def local_rules() -> set[str]:
    """Rules declared ``localrules:`` in workflow/rules/*.smk and the Snakefile, plus ``all`` (no action:
    Snakemake always runs such rules locally)."""
    names = {"all"}
    for f in [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]:
        for m in re.finditer(r"^localrules:\s*(.+)$", f.read_text(), flags=re.M):
            names.update(n.strip() for n in m.group(1).split(",") if n.strip())
    return names


def job_stats(text: str) -> dict[str, int]:
    """The "Job stats" table of a Snakemake run/dry run: {rule: count, ..., "total": n}."""
    lines = text.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == "Job stats:")
    except StopIteration:
        raise SystemExit(f"no 'Job stats' table in the dry run's output:\n{text[-4000:]}") from None
    counts = {}
    for ln in lines[start + 1:]:
        parts = ln.split()
        if not parts:
            if counts:
                break
            continue
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
            if parts[0] == "total":
                break
    return counts


def snakemake(work: Path, cfg: Path, *extra: str) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(cfg), "--cores", "1", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    out = proc.stdout + "\n" + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-4000:]}")
    return dt, out


def plan_and_count(work: Path, cfg: dict) -> tuple[dict, dict]:
    """Write ``cfg``, time the plan and the dry run, and count the jobs: (plan, job statistics)."""
    cfg_path = work / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    t_plan, _ = snakemake(work, cfg_path, "--until", "plan")
    t_dry, out = snakemake(work, cfg_path, "--dry-run")
    plan = json.loads((work / "out" / "plan.json").read_text())
    counts = job_stats(out)
    total = counts.pop("total", sum(counts.values()))
    local = local_rules()
    return plan, {"jobs": total, "cluster_jobs": total - sum(n for r, n in counts.items() if r in local),
                  "per_rule": counts, "plan_s": t_plan, "dry_run_s": t_dry}


def run_method(method: str, fpj: int | None, plate: Path, model: dict, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    cfg = {"input": str(plate), "output": str(work / "out"), "method": method,
           "model": {"checkpoint": model["checkpoint"], "decoder": model["decoder"], "device": "cpu"}}
    if fpj is not None:
        cfg["batching"] = {"fields_per_job": fpj}
    plan, stats = plan_and_count(work, cfg)
    return {"method": method, "fields_per_job": fpj, "fields": len(plan["fields"]), "batches": len(plan["batches"]),
            **stats}


def schema_default_fpj() -> int:
    schema = yaml.safe_load((REPO / "pipeline_lib" / "config.schema.yaml").read_text())
    return schema["properties"]["batching"]["properties"]["fields_per_job"]["default"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["ais", "apg"], choices=["ais", "apg", "amg"])
    ap.add_argument("--fields-per-job", type=int, nargs="+", default=None,
                    help="override batching.fields_per_job (default: leave it out, the schema default applies)")
    ap.add_argument("--rows", type=int, default=16, help="plate rows (A..P)")
    ap.add_argument("--columns", type=int, default=24)
    ap.add_argument("--fields", type=int, default=9, help="fields per well")
    ap.add_argument("--side", type=int, default=2160, help="field size in pixels (no pixels are written)")
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--volume", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                    help="job graph of a metadata-only volume of this shape instead of the plate")
    ap.add_argument("--blocks-per-job", type=int, nargs="+", default=None, help="--volume: override "
                    "volume.blocks_per_job (default: the schema default)")
    ap.add_argument("--tile", type=int, default=512, help="--volume: tiling.tile")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dag_bench_"))
    try:
        if args.volume:
            volume_main(args, tmp)
            return
        plate = tmp / "plate.ome.zarr"
        t0 = time.perf_counter()
        n = write_metadata_plate(plate, ROWS[:args.rows], args.columns, args.fields, args.side, args.levels)
        t_plate = time.perf_counter() - t0
        n_files = sum(1 for p in plate.rglob("*") if p.is_file())
        print(f"plate: {args.rows} x {args.columns} wells x {args.fields} fields = {n} fields "
              f"({args.side}^2 uint16, {args.levels} levels, metadata only: {n_files} files) in {t_plate:.1f} s")

        from pipeline_lib.models.tiny import write_tiny_model
        model = write_tiny_model(tmp / "model")

        t0 = time.perf_counter()
        snakemake_version = subprocess.run([sys.executable, "-m", "snakemake", "--version"], capture_output=True,
                                           text=True).stdout.strip()
        t_start = time.perf_counter() - t0
        print(f"snakemake {snakemake_version}: `snakemake --version` takes {t_start:.1f} s (start-up alone)")
        print(f"local rules (not cluster jobs): {', '.join(sorted(local_rules()))}")
        print(f"default batching.fields_per_job (schema): {schema_default_fpj()}")
        print()

        results = []
        for fpj in args.fields_per_job or [None]:
            for method in args.methods:
                tag = f"{method}_{fpj or 'default'}"
                r = run_method(method, fpj, plate, model, tmp / tag)
                results.append(r)
                print(f"  {tag}: plan {r['plan_s']:.1f} s, dry run {r['dry_run_s']:.1f} s, {r['jobs']} jobs",
                      flush=True)

        print()
        head = f"{'method':<7}{'fields/job':>11}{'fields':>8}{'batches':>9}{'jobs':>6}{'cluster':>9}" \
               f"{'plan s':>8}{'dry-run s':>11}  jobs per rule"
        print(head)
        print("-" * len(head))
        for r in results:
            fpj = r["fields_per_job"] if r["fields_per_job"] is not None else f"{schema_default_fpj()}*"
            rules = ", ".join(f"{k} {v}" for k, v in r["per_rule"].items())
            print(f"{r['method']:<7}{fpj!s:>11}{r['fields']:>8}{r['batches']:>9}{r['jobs']:>6}"
                  f"{r['cluster_jobs']:>9}{r['plan_s']:>8.1f}{r['dry_run_s']:>11.1f}  {rules}")
        if not args.fields_per_job:
            print("* schema default (batching left out of the config)")
        print("jobs = the dry run's Job stats total; cluster = jobs minus local rules; plan s = `--until plan` "
              "(model + plan checkpoint); dry-run s = wall clock of `snakemake --dry-run` (start-up included)")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
