"""Command line: ``python -m pipeline_lib {tiny-model,download,synthetic-plate,demo,validate}``."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _tiny(args) -> None:
    if args.kind == "cellpose":
        from .models.cellpose import write_tiny_cellpose
        path = write_tiny_cellpose(args.dir, seed=args.seed)
        print(f"wrote UNTRAINED tiny Cellpose-SAM model: {path}")
        return
    from .models.tiny import write_tiny_model
    paths = write_tiny_model(args.dir, seed=args.seed, conv_transpose=args.conv_transpose)
    print(f"wrote UNTRAINED tiny model: {paths}\nuse: model: {{checkpoint: {paths['checkpoint']}, "
          f"decoder: {paths['decoder']}}}")


def _download(args) -> None:
    from .models.download import ensure_published
    from .models.registry import MODELS
    for name in args.names or ["vit_b_lm"]:
        if name == "all":
            for n in MODELS:
                print(ensure_published(n, args.cache_dir))
        else:
            print(ensure_published(name, args.cache_dir))


def _synthetic(args) -> None:
    from .io.synthetic import write_synthetic_plate
    paths = write_synthetic_plate(args.path, rows=args.rows, columns=[int(c) for c in args.columns.split(",")],
                                  fields=args.fields, version=args.ngff)
    print(f"wrote {len(paths)} fields to {args.path}")


def _validate(args) -> None:
    from .config import ConfigError, check_runnable, load_config
    try:
        cfg = load_config(args.config)
        problems = [] if args.schema_only else check_runnable(cfg, args.config)
    except ConfigError as e:
        problems = [str(e)]
    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(1)
    print(f"{args.config}: valid" + (" (schema only: input and model not checked)" if args.schema_only else ""))


#: The demo plate's ground-truth label image (io.synthetic), scored in metrics.csv and used for oracle maps.
DEMO_GT = "nuclei_gt"


def _demo_model(name: str, timeout: float) -> str | None:
    """None when model ``name`` is in the cache (downloaded now if need be), else why it could not be had."""
    from .models.download import DownloadError, default_cache_dir, ensure_published, unreachable
    from .models.registry import get_published
    model = get_published(name)
    cache = default_cache_dir()
    cached = (cache / name).is_file() and (model.decoder is None or (cache / f"{name}_decoder").is_file())
    if not cached and (why := unreachable(model.sam.url, timeout)):
        return f"{model.sam.url}: {why}"
    try:
        ensure_published(name, timeout=timeout)
    except DownloadError as e:
        return str(e)
    return None


def _oracle_predictions(plate: Path, out: Path) -> Path:
    """Decoder maps computed from the plate's ground truth, marked as such in the store."""
    from .embed.oracle import write_oracle_predictions
    from .steps.model import mark_predictions_source
    store = out / "oracle_predictions.ome.zarr"
    write_oracle_predictions(str(plate), DEMO_GT, str(store))
    mark_predictions_source(store, {
        "kind": "oracle", "labels": DEMO_GT,
        "description": f"computed from the ground truth labels/{DEMO_GT} of the demo plate, not predicted by a "
                       "model (the model could not be downloaded): the labels show the pipeline, not a model"})
    return store


def _demo(args) -> None:
    """Synthetic plate + config, then the workflow with the model (vit_b_lm; needs internet once for the
    weights). Without them, the whole workflow runs on oracle decoder maps computed from the ground truth."""
    import yaml
    from .io.synthetic import write_synthetic_plate
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plate = out / "demo_plate.ome.zarr"
    columns = [int(c) for c in args.columns.split(",")]
    write_synthetic_plate(plate, rows=args.rows, columns=columns, fields=args.fields, shape=(384, 512), nuclei=40)
    cfg = {"input": str(plate), "output": str(out / "results"), "model": {"name": args.model},
           "ground_truth": DEMO_GT}
    print(f"demo plate: {plate}", flush=True)
    why = _demo_model(args.model, args.timeout)
    if why:
        print(f"\nThe model {args.model} could not be downloaded ({why}).\nRunning the demo OFFLINE on ORACLE "
              f"decoder maps computed from the demo plate's ground truth (labels/{DEMO_GT}), not on a model's "
              "predictions: labels, tables, metrics and report show what the workflow does; the scores are not "
              "a model's.\n", flush=True)
        cfg = {k: v for k, v in cfg.items() if k != "model"} | {
            "predictions": str(_oracle_predictions(plate, out)), "method": "ais"}
    cfg_path = out / "demo_config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    print(f"config: {cfg_path}", flush=True)
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(REPO),
           "--configfile", str(cfg_path), "--cores", str(args.cores), "--printshellcmds"]
    print(" ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc == 0:
        res = out / "results"
        print(f"\ndone{' (ORACLE maps from the ground truth, no model)' if why else ''}: open {res / 'report.html'} "
              f"in a browser; tables in {res} (objects.parquet, fields.csv, wells.csv, metrics.csv).\n"
              f"napari: napari --plugin napari-ome-zarr {plate}/A/1/0  (image, labels/sam and labels/{DEMO_GT})")
    sys.exit(rc)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline_lib", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("tiny-model", help="write an UNTRAINED tiny random-weight model (sam.pt, decoder.pt)")
    s.add_argument("dir")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--conv-transpose", action="store_true", help="decoder with transposed-conv upsampling")
    s.add_argument("--kind", choices=["sam", "cellpose"], default="sam",
                   help="sam: sam.pt + decoder.pt; cellpose: a Cellpose-SAM file in the cpsam layout")
    s.set_defaults(func=_tiny)
    s = sub.add_parser("download", help="download published models into the cache (run where internet works)")
    s.add_argument("names", nargs="*", help="model names, or 'all' (default vit_b_lm)")
    s.add_argument("--cache-dir", default=None)
    s.set_defaults(func=_download)
    s = sub.add_parser("synthetic-plate", help="write a small synthetic OME-Zarr plate with ground truth")
    s.add_argument("path")
    s.add_argument("--rows", default="AB")
    s.add_argument("--columns", default="1,2")
    s.add_argument("--fields", type=int, default=2)
    s.add_argument("--ngff", default="0.4", choices=["0.4", "0.5"])
    s.set_defaults(func=_synthetic)
    s = sub.add_parser("validate", help="validate a config file")
    s.add_argument("config")
    s.add_argument("--schema-only", action="store_true",
                   help="check keys and values only, not that the input, predictions and model exist (templates)")
    s.set_defaults(func=_validate)
    s = sub.add_parser("demo", help="synthetic plate + the workflow with a published model (offline: oracle maps)")
    s.add_argument("--out", default="demo_data")
    s.add_argument("--model", default="vit_b_lm")
    s.add_argument("--cores", type=int, default=2)
    s.add_argument("--timeout", type=float, default=15, help="seconds to wait for the model server")
    s.add_argument("--rows", default="AB", help="plate rows of the demo plate")
    s.add_argument("--columns", default="1,2,3", help="plate columns of the demo plate")
    s.add_argument("--fields", type=int, default=2, help="fields per well")
    s.set_defaults(func=_demo)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
