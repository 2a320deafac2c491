"""GPU benchmark in one run: encoder tiles/s (ours vs stock segment_anything), APG and AIS fields/s end to end.

Sections (each under its own time limit and try/except, so one failure still prints the others; the whole
run is bounded by ``--budget-s``):

* ``encoder``: ViT-B/L/H image encoders with random weights at the real input size (1024 x 1024), fp32 and
  bf16 (autocast, as the pipeline runs it), our SDPA encoder (``embed.encoder``) against stock
  segment_anything side by side, at batch 1 and at the batch size the benchmark picks (the largest of
  1, 2, 4, ... that still raises tiles/s by 5 % and fits in memory). Best of ``--repeats`` after a
  warm-up. Stock at batch 1, fp32 is what micro-sam's predictor runs per tile.
* ``apg`` / ``ais``: fields/s through the library's step functions (plan, predict + segment for AIS,
  prompt_segment for APG) on a copy of the real plate (../shared/data/bbbc039_plate_rowsAB.ome.zarr),
  with a random-weight full-size ViT-B model written in the published file layout and loaded by the
  same code as real models; prints the device-busy fraction and the stage split recorded in the job
  markers. Random weights give meaningless labels: this times the machinery, not the accuracy.

Peak GPU memory is printed per row on CUDA.

    python bench/gpu.py                       # on a GPU node (bounded by --budget-s 450; not yet run on one)
    python bench/gpu.py --device cpu --small  # a few minutes on a laptop-class CPU
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PLATE = REPO.parent / "shared" / "data" / "bbbc039_plate_rowsAB.ome.zarr"

ARCH = {  # segment_anything's build_sam_vit_{b,l,h}
    "vit_b": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, encoder_global_attn_indexes=[2, 5, 8, 11]),
    "vit_l": dict(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                  encoder_global_attn_indexes=[5, 11, 17, 23]),
    "vit_h": dict(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                  encoder_global_attn_indexes=[7, 15, 23, 31]),
}


class Budget:
    """Wall-clock budget of the whole run, and a per-section share of what is left."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _peak_mb(device: torch.device) -> str:
    if device.type != "cuda":
        return "-"
    return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}"


def stock_encoder(name: str, img_size: int = 1024, depth: int | None = None, seed: int = 0) -> torch.nn.Module:
    """segment_anything's ImageEncoderViT in the ``name`` shape, random weights (rel-pos tables too)."""
    from segment_anything.modeling.image_encoder import ImageEncoderViT
    a = ARCH[name]
    depth = depth or a["encoder_depth"]
    glob = [i for i in a["encoder_global_attn_indexes"] if i < depth] or [depth - 1]
    torch.manual_seed(seed)
    enc = ImageEncoderViT(img_size=img_size, patch_size=16, embed_dim=a["encoder_embed_dim"], depth=depth,
                          num_heads=a["encoder_num_heads"], mlp_ratio=4, out_chans=256, qkv_bias=True,
                          norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                          window_size=14, global_attn_indexes=glob)
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if "rel_pos" in n:
                p.normal_(0, 0.02)
    return enc.eval()


@torch.no_grad()
def time_encoder(enc, x: torch.Tensor, precision: str, repeats: int, deadline: float) -> float:
    """Best seconds per call of ``enc(x)`` after one warm-up call (fewer repeats near the deadline)."""
    device = x.device
    best = float("inf")
    for r in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        with _autocast(device, precision):
            enc(x)
        _sync(device)
        dt = time.perf_counter() - t0
        if r:
            best = min(best, dt)
        if time.perf_counter() + dt > deadline:
            break
    return best if best < float("inf") else dt


def _rate(a: float, b: float, unit: str = "") -> str:
    return "OOM" if a != a or b != b else f"{a / b:.2f}{unit}"


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def bench_encoder(args, device: torch.device, budget: Budget) -> list[list[str]]:
    """Rows: model, precision, batch, stock tiles/s, ours tiles/s, ratio, peak MB."""
    rows = []
    names = args.models.split(",")
    combos = [(n, p) for n in names for p in args.precisions.split(",")]
    for i, (name, precision) in enumerate(combos):
        share = budget.left() * args.encoder_share / (len(combos) - i)
        deadline = time.perf_counter() + share
        try:
            stock = stock_encoder(name, args.img_size, args.depth).to(device)
            from pipeline_lib.embed.encoder import accelerate_encoder
            ours = accelerate_encoder(copy.copy(stock))  # shares the parameters
            if args.compile:
                ours = torch.compile(ours)
            batches = [1] + ([b for b in (2, 4, 8, 16, 32, 64) if b <= args.max_batch] if args.pick_batch else [])
            picked, last = None, 0.0
            for b in batches:
                if time.perf_counter() > deadline:
                    break
                x = torch.randn(b, 3, args.img_size, args.img_size, device=device)
                try:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    t_ours = time_encoder(ours, x, precision, args.repeats, deadline)
                    peak = _peak_mb(device)
                except Exception as e:  # noqa: BLE001 - OOM ends the batch search
                    if _is_oom(e):
                        _free(device)
                        break
                    raise
                try:
                    t_stock = time_encoder(stock, x, precision, args.repeats, deadline)
                except Exception as e:  # noqa: BLE001 - stock may run out of memory where ours does not
                    if not _is_oom(e):
                        raise
                    _free(device)
                    t_stock = float("nan")
                rate = b / t_ours
                if b == 1:
                    rows.append([name, precision, "1", _rate(1, t_stock), f"{rate:.2f}", _rate(t_stock, t_ours, "x"), peak])
                elif rate < 1.05 * last:
                    break
                else:
                    picked = [name, precision, str(b), _rate(b, t_stock), f"{rate:.2f}", _rate(t_stock, t_ours, "x"), peak]
                last = max(last, rate)
                del x
            if picked:
                rows.append(picked)
            del stock, ours
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - report and go on with the next shape
            traceback.print_exc()
            rows.append([name, precision, "-", "error", type(e).__name__, str(e)[:60], "-"])
    return rows


def write_random_model(directory: Path, model_type: str) -> dict[str, str]:
    """A random-weight SAM + decoder in the published file layout (``tiny`` = the tiny test model), written
    the way ``models.tiny`` writes the tiny one, so that it loads through ``models.loading``."""
    from pipeline_lib.models.tiny import TINY_LOGIT_SCALE, write_tiny_model
    if model_type == "tiny":
        return write_tiny_model(directory)
    from segment_anything.build_sam import _build_sam
    from pipeline_lib.models.loading import InstanceDecoder
    torch.manual_seed(0)
    sam = _build_sam(checkpoint=None, **ARCH[model_type])
    with torch.no_grad():
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:  # non-degenerate mask logits, as the tiny model
            mlp.layers[-1].weight *= TINY_LOGIT_SCALE
            mlp.layers[-1].bias *= TINY_LOGIT_SCALE
    decoder = InstanceDecoder(sam.image_encoder, None, use_conv_transpose=False, initial_features=64)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(sam.state_dict(), directory / "sam.pt")
    torch.save(decoder.decoder_state_dict(), directory / "decoder.pt")
    return {"checkpoint": str(directory / "sam.pt"), "decoder": str(directory / "decoder.pt")}


def run_method(args, method: str, workdir: Path) -> dict:
    """(child process) One method over the first ``args.fields`` fields of a copy of the plate, one job."""
    from pipeline_lib.config import validate_config
    from pipeline_lib.steps.model import resolve_model
    from pipeline_lib.steps.plan import write_plan
    plate = workdir / "plate.ome.zarr"
    if not plate.exists():
        shutil.copytree(PLATE, plate)
    files = write_random_model(workdir / f"model_{args.model_type}", args.model_type)
    out = workdir / f"out_{method}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = validate_config({"input": str(plate), "output": str(out), "method": method,
                           "labels": {"name": f"bench_{method}"}, "tiling": {"tile": args.tile},
                           "model": {**files, "device": args.device},
                           "encoder": {"batch_size": args.e2e_batch, "precision": args.e2e_precision},
                           "batching": {"fields_per_job": 10**6}})
    plan = write_plan(cfg, str(out / "plan.json"))
    plan["batches"] = {"b0000": list(range(min(args.fields, len(plan["fields"]))))}
    info = resolve_model(cfg, progress=False)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    if method == "ais":
        from pipeline_lib.steps.predict import run_predict_batch
        from pipeline_lib.steps.segment import run_segment_batch
        marker = str(out / "predict.json")
        res = run_predict_batch(cfg, plan, "b0000", info, marker)
        t_pred = time.perf_counter() - t0
        seg = run_segment_batch(cfg, plan, "b0000", marker, str(out / "segment.json"))
        fields = seg["fields"]
        extra = {"segment_s": round(time.perf_counter() - t0 - t_pred, 2)}
    else:
        from pipeline_lib.steps.prompt_segment import run_prompt_segment_batch
        res = run_prompt_segment_batch(cfg, plan, "b0000", info, str(out / "prompt.json"))
        fields, extra = res["fields"], {}
    wall = time.perf_counter() - t0
    n_ok = sum(v["status"] in ("ok", "empty") for v in fields.values())
    return {"method": method, "fields": len(fields), "ok": n_ok, "wall_s": wall, "timing": res.get("timing", {}),
            "n_objects": sum(v.get("n_objects", 0) for v in fields.values()), "peak_mb": _peak_mb(device), **extra}


def bench_pipeline(args, device: torch.device, budget: Budget, methods: list[str]) -> list[list[str]]:
    """Each method in a child process under its share of the budget (killed when it runs over)."""
    import json
    import subprocess
    rows = []
    if not PLATE.exists():
        return [[m, "-", "-", "-", "-", f"plate not found: {PLATE}", "-"] for m in methods]
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        for i, method in enumerate(methods):
            limit = max(10.0, budget.left() / (len(methods) - i) - 5)
            cmd = [sys.executable, __file__, *args.argv, "--child", method, "--workdir", tmp]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit,
                                      env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                          [str(REPO), os.environ.get("PYTHONPATH", "")])})
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                if proc.returncode or not lines:
                    rows.append([method, "-", "-", "-", "-", "failed: " + proc.stderr.strip()[-200:].replace("\n", " "), "-"])
                    continue
                r = json.loads(lines[-1])
            except subprocess.TimeoutExpired:
                rows.append([method, "-", f"> {limit:.0f}", "-", "-", "time limit", "-"])
                continue
            t = r["timing"]
            stages = ", ".join(f"{k} {v:.1f}" for k, v in t.get("stages_s", {}).items())
            if "segment_s" in r:
                stages += f", AIS segment (CPU) {r['segment_s']:.1f}"
            busy = t.get("device_busy_fraction")
            rows.append([method, f"{r['ok']}/{r['fields']}", f"{r['wall_s']:.1f}", f"{r['fields'] / r['wall_s']:.3f}",
                         "-" if busy is None else f"{100 * busy:.0f} % of {t['wall_s']:.1f} s", stages, str(r["peak_mb"])])
    return rows


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    sys.stdout.flush()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true",
                    help="CPU smoke setting: ViT-B encoder only, 512 x 512, batch 1, 1 timed call; "
                    "tiny model on 2 fields, one 1024 tile each")
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock bound of the whole run")
    ap.add_argument("--sections", default="encoder,apg,ais")
    ap.add_argument("--models", default=None, help="encoder shapes (default vit_b,vit_l,vit_h; vit_b with --small)")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--img-size", type=int, default=None, help="encoder input (1024; 512 with --small)")
    ap.add_argument("--tile", type=int, default=None, help="tiling.tile for apg/ais (512; 1024 with --small)")
    ap.add_argument("--depth", type=int, default=None, help="encoder blocks (default: the published depth)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls after the warm-up (3; 1 with --small)")
    ap.add_argument("--max-batch", type=int, default=None, help="largest batch tried (default 32, 1 with --small)")
    ap.add_argument("--no-pick-batch", dest="pick_batch", action="store_false")
    ap.add_argument("--compile", action="store_true", help="torch.compile our encoder")
    ap.add_argument("--encoder-share", type=float, default=0.5, help="share of the budget for the encoder section")
    ap.add_argument("--fields", type=int, default=None, help="plate fields for apg/ais (default 28, 2 with --small)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model-type", default=None, help="random model for apg/ais: vit_b/vit_l/vit_h or tiny "
                    "(default vit_b; tiny with --small)")
    ap.add_argument("--e2e-batch", type=int, default=None, help="encoder.batch_size for apg/ais (default 8)")
    ap.add_argument("--e2e-precision", default="fp32", help="encoder.precision for apg/ais")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.repeats is None:
        args.repeats = 1 if args.small else 3
    if args.img_size is None:
        args.img_size = 512 if args.small else 1024
    if args.tile is None:
        args.tile = 1024 if args.small else 512
    if args.models is None:
        args.models = "vit_b" if args.small else "vit_b,vit_l,vit_h"
    if args.max_batch is None:
        args.max_batch = 1 if args.small else 32
    if args.fields is None:
        args.fields = 2 if args.small else 28
    if args.model_type is None:
        args.model_type = "tiny" if args.small else "vit_b"
    if args.e2e_batch is None:
        args.e2e_batch = 8
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        import json
        print(json.dumps(run_method(args, args.child, Path(args.workdir))))
        return 0
    device = torch.device(args.device)
    desc = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"bench/gpu.py on {desc}, torch {torch.__version__}, budget {args.budget_s:.0f} s")
    sections = args.sections.split(",")
    if "encoder" in sections:
        try:
            rows = bench_encoder(args, device, budget)
            print_table(f"Image encoder, {args.img_size} x {args.img_size}, random weights, tiles/s "
                        f"(best of {args.repeats} after warm-up)",
                        ["model", "precision", "batch", "stock segment_anything", "ours (SDPA)", "ours / stock",
                         "peak MB (ours)"], rows)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    e2e = [s for s in sections if s in ("apg", "ais")]
    if e2e:
        try:
            rows = bench_pipeline(args, device, budget, e2e)
            print_table(f"End to end through the library, random-weight {args.model_type} model, tile {args.tile}, "
                        f"encoder batch {args.e2e_batch}, {args.e2e_precision}, real plate",
                        ["method", "fields", "seconds", "fields/s", "device busy", "stage split (s)", "peak MB"], rows)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    print(f"\ntotal {args.budget_s - budget.left():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
