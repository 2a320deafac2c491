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
    from .config import load_config
    load_config(args.config)
    print(f"{args.config}: valid")


def _demo(args) -> None:
    """Synthetic plate + config, then the workflow with vit_b_lm (needs internet once for the weights)."""
    import yaml
    from .io.synthetic import write_synthetic_plate
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plate = out / "demo_plate.ome.zarr"
    write_synthetic_plate(plate, rows="AB", columns=[1, 2, 3], fields=2, shape=(384, 512), nuclei=40)
    cfg = {"input": str(plate), "output": str(out / "results"), "model": {"name": args.model}}
    cfg_path = out / "demo_config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    print(f"demo plate: {plate}\nconfig: {cfg_path}", flush=True)
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(REPO),
           "--configfile", str(cfg_path), "--cores", str(args.cores), "--printshellcmds"]
    print(" ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc == 0:
        print(f"\ndone: {out / 'results' / 'summary.json'}; open {plate} in napari (napari-ome-zarr) to see "
              "the labels.")
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
    s.set_defaults(func=_validate)
    s = sub.add_parser("demo", help="synthetic plate + the workflow with a published model")
    s.add_argument("--out", default="demo_data")
    s.add_argument("--model", default="vit_b_lm")
    s.add_argument("--cores", type=int, default=2)
    s.set_defaults(func=_demo)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
