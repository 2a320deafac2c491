"""3D accuracy of the volume workflow from per-slice predictions, per dataset, side by side with micro-sam.

For every volume with a 3D ground truth (GT) the workflow's library functions (the four passes the Snakemake
rules call, small blocks: tile 48, halo 24, z_block 16) run on

* **oracle maps**: per-slice decoder maps computed from each z-slice of the GT (``embed.oracle``: what a
  perfect 2D model would predict), written as the ``predictions`` store; AIS with micro-sam's generate()
  thresholds (0.5 / 0.5);
* **GT slices**: the 2D objects of every GT slice (``relabel_slices``) replace pass 1 (a segmenter that
  returns them), so only the stitching and the 3D merge are measured; *perturbed* also drops 10% of the 2D
  objects and splits 5% in two (``perturb_slices``, mean over --seeds).

micro-sam 1.8.14 rows (``make bench-env``; skipped when not importable) run micro-sam's own pipeline in
memory on the same maps: ``InstanceSegmentationWithDecoder.generate()`` per slice, then
``merge_instance_segmentation_3d`` with its defaults. Columns: mean mSA and SA50 against the 3D GT and the
split of errors as fractions of the GT objects: *merged* (its main predicted object is also the main one
of another GT object), *split* (>= 2 predicted objects hold >= 20% of it each), *missed* (< 50% of it
predicted at all), *caps* (its main predicted object misses its first or last slice). "1 block" is the mSA
of small blocks against one block (the same config with one tile and one slab).

Datasets: ``gonuclear`` (5 real nucleus volumes, voxel 0.28 x 0.127 x 0.127 um), ``ovule`` (PlantSeg dense
cells; provenance unclear, for pipeline checks; the file has no scale: 0.235 x 0.075 x 0.075 um assumed, the
PlantSeg ovule acquisition), ``synthetic`` (stacked ellipsoidal nuclei, z spacing 1x, 3x, 5x the yx
spacing, normal and dense packing). ``--params`` adds the merge parameter table (in memory, GT slices),
``--noisy`` a robustness table (GoNuclear oracle maps blurred and with pixel noise, in memory).

    .venv-bench/bin/python bench/volume_accuracy.py [--datasets gonuclear,ovule,synthetic] [--seeds 0,1,2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import zarr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"

from pipeline_lib.config import merge3d_params, validate_config  # noqa: E402
from pipeline_lib.embed.oracle import oracle_maps  # noqa: E402
from pipeline_lib.io.ome_zarr import versioned, write_ngff  # noqa: E402
from pipeline_lib.io.synthetic_volume import nuclei_labels  # noqa: E402
from pipeline_lib.io.volume import create_volume_maps  # noqa: E402
from pipeline_lib.measure.metrics import segmentation_scores  # noqa: E402
from pipeline_lib.stitch.merge3d import merge_slices_3d, perturb_slices, relabel_slices  # noqa: E402
from pipeline_lib.testing.volume import SliceLabels, run_volume_steps  # noqa: E402


# ---------------------------------------------------------------- data

def gonuclear():
    import tifffile
    d = SHARED / "gonuclear_3d_nuclei_mini"
    if not d.exists():
        print(f"{d} not present: skipped")
        return []
    return [(f"gonuclear {i}", tifffile.imread(d / f"{i}_mini_labels.tif").astype(np.uint32), (0.28, 0.127, 0.127))
            for i in (1135, 1136, 1137, 1139, 1170)]


def ovule():
    import tifffile
    f = SHARED / "plantseg_ovule_sample" / "sample_ovule_labels.tif"
    if not f.exists():
        print(f"{f} not present: skipped")
        return []
    return [("ovule", tifffile.imread(f).astype(np.uint32), (0.235, 0.075, 0.075))]


def synthetic():
    """Nuclei of 13-23 px in yx, isotropic in physical units: z spacing r x yx -> cells of 24 / r slices."""
    out = []
    for r in (1, 3, 5):
        for cell_xy, fill, kind in ((24, 0.8, "normal"), (16, 0.95, "dense")):
            cz = max(2, round(cell_xy / r))
            shape = (48, 128, 128)
            gt = nuclei_labels(tuple(slice(0, s) for s in shape), shape, cell=(cz, cell_xy, cell_xy), fill=fill)
            out.append((f"synthetic z{r}x {kind}", gt, (0.25 * cell_xy / cz, 0.25, 0.25)))
    return out


DATASETS = {"gonuclear": gonuclear, "ovule": ovule, "synthetic": synthetic}


def write_inputs(d: Path, gt: np.ndarray, voxel) -> np.ndarray:
    """The volume as an OME-Zarr image (zyx, NGFF 0.4) and its per-slice oracle maps as `predictions`."""
    root = zarr.open_group(str(d / "vol.ome.zarr"), mode="w", zarr_format=2)
    root.create_array("s0", data=((gt > 0) * 200).astype(np.uint8), chunks=(1, 64, 64),
                      chunk_key_encoding={"name": "v2", "separator": "/"})
    ms = versioned({"axes": [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"], "name": "v",
                    "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale",
                                                                               "scale": list(voxel)}]}]}, "0.4")
    write_ngff(root, {"multiscales": [ms]}, "0.4")
    maps = create_volume_maps(zarr.open_group(str(d / "pred.ome.zarr"), mode="w", zarr_format=2), gt.shape,
                              (64, 64), "0.4")
    m = np.stack([oracle_maps(gt[z]) for z in range(gt.shape[0])], axis=1).astype(np.float16)
    maps[:] = m
    return m.astype(np.float32)


# ---------------------------------------------------------------- pipelines

def run_workflow(d: Path, name: str, tile: int, halo: int, z_block: int, extra: dict,
                 slices: np.ndarray | None = None) -> np.ndarray:
    """The four passes of the volume workflow in-process (what the Snakemake rules call); the labels."""
    out = str(d / f"out_{name}")
    cfg = {"input": str(d / "vol.ome.zarr"), "output": out, "predictions": str(d / "pred.ome.zarr"),
           "tiling": {"tile": tile, "halo": halo}, "labels": {"name": name}}
    for k, v in extra.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    cfg["volume"] = {"z_block": z_block, **cfg.get("volume", {})}
    run_volume_steps(cfg, SliceLabels(slices) if slices is not None else None)
    return np.asarray(zarr.open_array(str(d / "vol.ome.zarr" / "labels" / name / "s0"), mode="r"))


def micro_sam_available() -> bool:
    try:
        import micro_sam.instance_segmentation  # noqa: F401
        import micro_sam.multi_dimensional_segmentation  # noqa: F401
        return True
    except ImportError:
        return False


def micro_sam_ais_merge(maps: np.ndarray) -> np.ndarray:
    """micro-sam 1.8.14 on the same maps: generate() per slice (its defaults), merge_instance_segmentation_3d."""
    from micro_sam.instance_segmentation import InstanceSegmentationWithDecoder
    from micro_sam.multi_dimensional_segmentation import merge_instance_segmentation_3d
    seg = np.zeros(maps.shape[1:], np.uint64)
    offset = 0
    for z in range(maps.shape[1]):
        ms = InstanceSegmentationWithDecoder(None, None)
        ms._foreground, ms._center_distances, ms._boundary_distances = (np.array(maps[c, z]) for c in range(3))
        ms._is_initialized = True
        s = ms.generate(output_mode="instance_segmentation").astype(np.uint64)
        seg[z] = np.where(s > 0, s + offset, 0)
        offset = max(offset, int(seg[z].max()))
    return merge_instance_segmentation_3d(seg, verbose=False)


# ---------------------------------------------------------------- scores

def error_split(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Fractions of GT objects merged, split, missed, and with a missing cap (see the module docstring)."""
    p, g = pred.ravel().astype(np.int64), gt.ravel().astype(np.int64)
    ng = int(g.max()) + 1
    size_g = np.bincount(g, minlength=ng)
    ids = np.flatnonzero(size_g[1:]) + 1
    both = (p > 0) & (g > 0)
    key, inter = np.unique(g[both] * (int(p.max()) + 1) + p[both], return_counts=True)
    gi, pi = np.divmod(key, int(p.max()) + 1)
    covered = np.bincount(gi, weights=inter, minlength=ng)
    order = np.lexsort((-inter, gi))  # per GT object, its largest overlap first
    first = np.unique(gi[order], return_index=True)[1]
    main = np.zeros(ng, np.int64)
    main[gi[order][first]] = pi[order][first]
    frac = inter / size_g[gi]
    n_big = np.bincount(gi[frac >= 0.2], minlength=ng)
    missed = covered[ids] < 0.5 * size_g[ids]
    split = n_big[ids] >= 2
    mains = main[ids]
    cnt = np.bincount(mains[~missed], minlength=int(p.max()) + 1)
    merged = ~missed & (mains > 0) & (cnt[mains] >= 2)
    gz = np.nonzero(gt)[0]
    glab = gt[gt > 0].astype(np.int64)
    zmin = np.full(ng, 1 << 30)
    zmax = np.full(ng, -1)
    np.minimum.at(zmin, glab, gz)
    np.maximum.at(zmax, glab, gz)
    hit = pred[gt > 0].astype(np.int64) == main[glab]
    hz_min = np.full(ng, 1 << 30)
    hz_max = np.full(ng, -1)
    np.minimum.at(hz_min, glab[hit], gz[hit])
    np.maximum.at(hz_max, glab[hit], gz[hit])
    caps = ~missed & ((hz_min[ids] > zmin[ids]) | (hz_max[ids] < zmax[ids]))
    n = max(len(ids), 1)
    return {"merged": merged.sum() / n, "split": split.sum() / n, "missed": missed.sum() / n, "caps": caps.sum() / n}


def score(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    s = segmentation_scores(pred, gt)
    return {"msa": s["msa"], "sa50": s["sa50"], **error_split(pred, gt)}


COLS = ("msa", "sa50", "merged", "split", "missed", "caps")


def print_table(title: str, rows: dict[str, list[dict]], one: dict[str, list[float]]) -> None:
    w = max([len(k) for k in rows] + [10])
    print(f"\n{title}")
    print(f"{'pipeline':<{w}}  " + "  ".join(f"{c:>6}" for c in COLS) + "  1 block")
    for name, vals in rows.items():
        mean = {c: np.mean([v[c] for v in vals]) for c in COLS}
        ob = f"{np.min(one[name]):.3f}" if one.get(name) else "     -"
        print(f"{name:<{w}}  " + "  ".join(f"{mean[c]:6.3f}" for c in COLS) + f"  {ob:>7}", flush=True)


# ---------------------------------------------------------------- main

ORACLE = {  # name -> workflow config overrides (AIS thresholds 0.5/0.5 as micro-sam's generate())
    "ours slices + rule micro_sam (parity option)": {"volume": {"instances": "slices", "merge": {"rule": "micro_sam"}}},
    "ours slices (per-slice AIS) + overlap": {"volume": {"instances": "slices"}},
    "ours slices, keep_unseeded + overlap": {"volume": {"instances": "slices"}, "ais": {"keep_unseeded": True}},
    "ours default (stack + overlap)": {},
    "ours stack, max_gap_scale 0 (gap 2)": {"volume": {"merge": {"max_gap_scale": 0}}},
}
GT = {
    "ours default (overlap, derived gap)": {},
    "ours max_gap_scale 0 (gap 2 as configured)": {"volume": {"merge": {"max_gap_scale": 0}}},
    "ours rule micro_sam": {"volume": {"merge": {"rule": "micro_sam"}}},
}
NEW = ("ours default (stack + overlap)", "ours default (overlap, derived gap)")
TH = {"ais": {"center_distance_threshold": 0.5, "boundary_distance_threshold": 0.5}}


def run_dataset(name: str, vols, args, ms: bool) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    rows_o: dict[str, list] = {}
    rows_g: dict[str, list] = {}
    rows_p: dict[str, list] = {}
    one: dict[str, list] = {}
    t0 = time.time()
    tile = args.tile or (48 if name == "gonuclear" else 64)
    # the 2D watershed of a tile agrees with its neighbour's only where the halo is wider than the
    # objects: the ovule cells are up to 58 px across (halo 32: 0.754 mSA small blocks vs one block)
    halo = args.halo if args.halo is not None else (tile if name == "ovule" else tile // 2)
    for vname, gt, voxel in vols:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            maps = write_inputs(d, gt, voxel)
            small = (tile, halo, args.z_block)
            big = (max(gt.shape[1:]), 0, gt.shape[0])
            if ms:
                rows_o.setdefault("micro-sam 1.8.14 per-slice AIS + merge3d defaults", []).append(
                    score(micro_sam_ais_merge(maps), gt))
            for k, (rname, extra) in enumerate(ORACLE.items()):
                extra = {**extra, "ais": {**TH["ais"], **extra.get("ais", {})}}
                lab = run_workflow(d, f"o{k}", *small, extra)
                rows_o.setdefault(rname, []).append(score(lab, gt))
                if rname in NEW:
                    ref = run_workflow(d, f"o{k}one", *big, extra)
                    one.setdefault(rname, []).append(segmentation_scores(lab, ref)["msa"])
            clean = relabel_slices(gt)
            if ms:
                from micro_sam.multi_dimensional_segmentation import merge_instance_segmentation_3d
                rows_g.setdefault("micro-sam 1.8.14 merge3d defaults", []).append(
                    score(merge_instance_segmentation_3d(clean, verbose=False), gt))
            for k, (rname, extra) in enumerate(GT.items()):
                lab = run_workflow(d, f"g{k}", *small, extra, slices=clean)
                rows_g.setdefault(rname, []).append(score(lab, gt))
                if rname in NEW:
                    ref = run_workflow(d, f"g{k}one", *big, extra, slices=clean)
                    one.setdefault(rname, []).append(segmentation_scores(lab, ref)["msa"])
            for seed in seeds:
                pert = relabel_slices(perturb_slices(clean, seed=seed))
                if ms:
                    rows_p.setdefault("micro-sam 1.8.14 merge3d defaults", []).append(
                        score(merge_instance_segmentation_3d(pert, verbose=False), gt))
                for k, (rname, extra) in enumerate(GT.items()):
                    lab = run_workflow(d, f"p{k}_{seed}", *small, extra, slices=pert)
                    rows_p.setdefault(rname, []).append(score(lab, gt))
        if args.per_volume:
            print(f"  {vname}: default oracle {rows_o['ours default (stack + overlap)'][-1]['msa']:.3f}, "
                  f"GT slices {rows_g['ours default (overlap, derived gap)'][-1]['msa']:.3f}", flush=True)
    n = len(vols)
    blk = f"tile {tile}, halo {halo}, z_block {args.z_block}"
    print_table(f"== {name} ({n} volumes), per-slice oracle maps, workflow ({blk})", rows_o, one)
    print_table(f"== {name}, ground-truth slices", rows_g, one)
    print_table(f"== {name}, ground-truth slices perturbed (drop 10%, split 5%; seeds {seeds})", rows_p, {})
    print(f"({time.time() - t0:.0f} s)")


PARAMS = [
    ("default", {}),
    ("max_gap_scale 0 (gap 2)", {"max_gap_scale": 0}),
    ("max_gap_scale 0.1", {"max_gap_scale": 0.1}),
    ("max_gap_scale 0.3", {"max_gap_scale": 0.3}),
    ("max_gap 0", {"max_gap": 0}),
    ("taper 0 (no waist test)", {"taper": 0}),
    ("taper 0.7", {"taper": 0.7}),
    ("taper 0.9", {"taper": 0.9}),
    ("beta 0.3", {"beta": 0.3}),
    ("beta 0.5", {"beta": 0.5}),
    ("beta 0.8", {"beta": 0.8}),
    ("fill_gaps false", {"fill_gaps": False}),
]


def params_table(sets: dict[str, list], seeds: list[int]) -> None:
    """mSA of merge_slices_3d (in memory) on GT slices, clean / perturbed, per dataset and parameter."""
    base = merge3d_params(validate_config({"input": "x", "output": "y"}))
    data = {}
    for name, vols in sets.items():
        data[name] = [(gt, relabel_slices(gt), [relabel_slices(perturb_slices(relabel_slices(gt), seed=s))
                                                for s in seeds], voxel[0] / voxel[1]) for _, gt, voxel in vols]
    cols = [f"{n} {c}" for n in data for c in ("clean", "pert")]
    w = max(len(p[0]) for p in PARAMS)
    print(f"\n== merge parameters (in memory, GT slices; perturbed: mean over seeds {seeds})")
    print(f"{'parameter':<{w}}  " + "  ".join(cols))
    for pname, kw in PARAMS:
        vals = []
        for name, vs in data.items():
            c, p = [], []
            for gt, clean, perts, an in vs:
                prm = replace(base, anisotropy=an, **kw)
                c.append(segmentation_scores(merge_slices_3d(clean, prm), gt)["msa"])
                p.extend(segmentation_scores(merge_slices_3d(x, prm), gt)["msa"] for x in perts)
            vals += [np.mean(c), np.mean(p)]
        print(f"{pname:<{w}}  " + "  ".join(f"{v:>{len(c)}.3f}" for v, c in zip(vals, cols)), flush=True)


def noisy_table(vols, seed: int = 0) -> None:
    """Robustness, in memory: the oracle maps blurred (Gaussian, per slice) plus independent pixel noise,
    per-slice AIS (with and without keep_unseeded) against the stack AIS, each then merged (default)."""
    from scipy import ndimage

    from pipeline_lib.instances.ais import AISParams, ais_single
    from pipeline_lib.instances.ais3d import ais_stack

    def unique_ids(per):
        per = per.astype(np.int64)
        off = np.concatenate([[0], np.cumsum(per.reshape(len(per), -1).max(axis=1))[:-1]])
        return np.where(per > 0, per + off[:, None, None], 0)

    rng = np.random.default_rng(seed)
    base = merge3d_params(validate_config({"input": "x", "output": "y"}))
    print(f"\n== noisy maps (in memory, {len(vols)} volumes): mSA after the default merge")
    print(f"{'blur, noise':<14}  {'slices':>7}  {'slices+keep_unseeded':>21}  {'stack':>7}")
    for blur, noise in ((0.0, 0.0), (1.0, 0.1), (1.5, 0.2), (2.0, 0.3)):
        res = {"slices": [], "keep": [], "stack": []}
        for _, gt, voxel in vols:
            an = voxel[0] / voxel[1]
            m = np.stack([oracle_maps(gt[z]) for z in range(gt.shape[0])], axis=1).astype(np.float32)
            if blur:
                m = ndimage.gaussian_filter(m, (0, 0, blur, blur)) + rng.normal(0, noise, m.shape)
                m = np.clip(m, 0, 1).astype(np.float32)
            prm = replace(base, anisotropy=an)
            for k, p in (("slices", AISParams()), ("keep", AISParams(keep_unseeded=True))):
                per = np.stack([ais_single(m[:, z], p) for z in range(m.shape[1])])
                res[k].append(segmentation_scores(merge_slices_3d(unique_ids(per), prm), gt)["msa"])
            res["stack"].append(segmentation_scores(merge_slices_3d(unique_ids(ais_stack(m, AISParams(), an)), prm),
                                                    gt)["msa"])
        print(f"{f'{blur}, {noise}':<14}  {np.mean(res['slices']):7.3f}  {np.mean(res['keep']):21.3f}  "
              f"{np.mean(res['stack']):7.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="gonuclear,ovule,synthetic")
    ap.add_argument("--seeds", default="0,1,2", help="perturbation seeds")
    ap.add_argument("--tile", type=int, default=None, help="default: 48 (gonuclear), 64 (ovule, synthetic)")
    ap.add_argument("--halo", type=int, default=None, help="default: tile / 2 (ovule: tile)")
    ap.add_argument("--z-block", type=int, default=16)
    ap.add_argument("--params", action="store_true", help="also the merge parameter table (in memory)")
    ap.add_argument("--no-workflow", dest="workflow", action="store_false", help="only the parameter table")
    ap.add_argument("--per-volume", action="store_true")
    ap.add_argument("--noisy", action="store_true", help="also the noisy-maps table (in memory, gonuclear)")
    args = ap.parse_args()
    ms = micro_sam_available()
    if not ms:
        print("micro_sam not importable (make bench-env): micro-sam rows skipped")
    sets = {}
    for name in args.datasets.split(","):
        vols = DATASETS[name]()
        if name == "synthetic":
            for v in vols:
                sets.setdefault(v[0], []).append(v)
        elif vols:
            sets[name] = vols
    if args.workflow:
        for name, vols in sets.items():
            run_dataset(name, vols, args, ms)
    if args.params or (not args.workflow and not args.noisy):
        params_table(sets, [int(s) for s in args.seeds.split(",")])
    if args.noisy and "gonuclear" in sets:
        noisy_table(sets["gonuclear"])


if __name__ == "__main__":
    main()
