"""Slice-merging rules on real and synthetic nuclei volumes, and the scaling of the graph solve.

Protocol: 3D ground truth -> every z-slice relabelled independently (2D connected components of each
object, 8-neighbourhood: relabel_slices) -> merge -> mSA against the 3D ground truth, mean over the
volumes. "perturbed": additionally 10% of the 2D objects dropped and 5% cut in two
(perturb_slices, seeds given by --seeds; the mean over seeds is shown), then relabelled again.
Data: the 5 gonuclear volumes in ../shared/data (100^3, skipped when absent) and 2 synthetic volumes
(48x200x200, pipeline_lib.io.synthetic_volume: ellipsoids stacked in z, caps often touching).
micro-sam rows need micro-sam 1.8.14 (`.venv-bench/bin/python bench/merge3d.py`); otherwise skipped.
Timing: merge_nodes on a synthetic graph of --nodes nodes (chains along z with gaps, contacts and
some false strong contacts that create conflicts).

    python bench/merge3d.py [--seeds 0,1,2] [--nodes 1000000]
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "gonuclear_3d_nuclei_mini"
IDS = (1135, 1136, 1137, 1139, 1170)
ANISOTROPY = {"gonuclear": 0.28 / 0.127, "synthetic": 2.0}  # z / yx spacing (synthetic: voxel 0.5 x 0.25 x 0.25)

from pipeline_lib.measure.metrics import mean_segmentation_accuracy  # noqa: E402
from pipeline_lib.stitch.merge3d import (Merge3DParams, edge_costs, merge_nodes,  # noqa: E402
                                         merge_slices_3d, perturb_slices, relabel_slices)


def load():
    import tifffile
    return [tifffile.imread(DATA / f"{i}_mini_labels.tif") for i in IDS]


def synthetic_graph(n_nodes: int, chain: int = 20, seed: int = 0):
    """(sizes, node_z, u, v, count) of ~n_nodes nodes: chains of `chain` slices with the area profile
    of an ellipsoid (+-10% noise); 5% of the nodes missing (skip edge dz=2 across), touching
    neighbour chains overlap slightly (repulsive) at 3 random slices, 2% of these contacts overlap
    strongly (conflicts for the solver)."""
    rng = np.random.default_rng(seed)
    n_chain = max(1, n_nodes // chain)
    n = n_chain * chain + 1
    z = np.arange(chain)
    profile = 1.0 - ((z - (chain - 1) / 2) / (chain / 2 + 1)) ** 2
    area = rng.uniform(200, 800, (n_chain, 1)) * profile * rng.uniform(0.9, 1.1, (n_chain, chain))
    node_z = np.concatenate([[0], np.tile(z, n_chain)])
    sizes = np.concatenate([[0], np.maximum(area, 5).astype(np.int64).ravel()])
    ids = 1 + np.arange(n_chain * chain).reshape(n_chain, chain)
    u, v = ids[:, :-1].ravel(), ids[:, 1:].ravel()
    gap = (rng.random(len(u)) < 0.05) & (node_z[v] < chain - 1)
    sizes[v[gap]] = 0  # node v missing: link u to the node above v
    keep = ~gap & (sizes[u] > 0)
    uu = np.concatenate([u[keep], u[gap]])
    vv = np.concatenate([v[keep], v[gap] + 1])
    ok = (sizes[uu] > 0) & (sizes[vv] > 0)
    uu, vv = uu[ok], vv[ok]
    cnt = (0.9 * np.minimum(sizes[uu], sizes[vv])).astype(np.int64)
    c = np.repeat(np.arange(n_chain - 1), 3)
    zc = rng.integers(0, chain - 1, len(c))
    cu, cv = ids[c, zc], ids[c + 1, zc + 1]
    ok = (sizes[cu] > 0) & (sizes[cv] > 0)
    cu, cv = cu[ok], cv[ok]
    frac = np.where(rng.random(len(cu)) < 0.02, 0.8, 0.05)
    ccnt = (frac * np.minimum(sizes[cu], sizes[cv])).astype(np.int64)
    u, v = np.concatenate([uu, cu]), np.concatenate([vv, cv])
    count = np.maximum(np.concatenate([cnt, ccnt]), 1)
    uniq = np.unique(u * n + v, return_index=True)[1]
    return sizes, node_z, u[uniq], v[uniq], count[uniq]


def conflicts(graph, params: Merge3DParams) -> tuple[int, int]:
    """(number of components of attractive edges holding a repulsive edge, their number of nodes)."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components
    u, v, c = edge_costs(*graph, params=params)
    n = len(graph[0])
    att = c > 0
    _, comp = connected_components(sparse.coo_matrix((np.ones(att.sum()), (u[att], v[att])), shape=(n, n)),
                                   directed=False)
    bad = np.unique(comp[u[~att]][comp[u[~att]] == comp[v[~att]]])
    return len(bad), int(np.isin(comp, bad).sum())


def datasets() -> dict[str, list[np.ndarray]]:
    """3D ground truths: the real nuclei volumes (if present) and stacked synthetic nuclei."""
    from pipeline_lib.io.synthetic_volume import nuclei_labels
    out = {}
    if DATA.exists():
        out["gonuclear"] = load()
    else:
        print(f"{DATA} not present: real volumes skipped")
    shape = (48, 200, 200)
    out["synthetic"] = [nuclei_labels(tuple(slice(0, n) for n in shape), shape, seed=s) for s in (0, 1)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0", help="perturbation seeds, comma separated")
    ap.add_argument("--nodes", type=int, default=1_000_000)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    sets = {}
    for name, gts in datasets().items():
        clean = [relabel_slices(g) for g in gts]
        sets[name] = (gts, clean, [[relabel_slices(perturb_slices(c, seed=s)) for c in clean] for s in seeds])
    try:
        from micro_sam.multi_dimensional_segmentation import merge_instance_segmentation_3d
    except ImportError:
        merge_instance_segmentation_3d = None
        print("micro_sam not importable: skipping the real micro-sam rows")

    def score(fn):
        out = []
        for name, (gts, clean, pert) in sets.items():
            an = ANISOTROPY[name]
            out.append(np.mean([mean_segmentation_accuracy(fn(s, an), g) for s, g in zip(clean, gts)]))
            out.append(np.mean([[mean_segmentation_accuracy(fn(s, an), g) for s, g in zip(p, gts)] for p in pert]))
        return out

    rows = []
    if merge_instance_segmentation_3d is not None:
        for name, kw in (("micro-sam 1.8.14 defaults", {}),
                         ("micro-sam 1.8.14 gap_closing=2 min_z_extent=2", dict(gap_closing=2, min_z_extent=2))):
            rows.append((name, score(lambda s, an, kw=kw: merge_instance_segmentation_3d(s, verbose=False, **kw))))
    variants = [
        ("ours rule=micro_sam", Merge3DParams(rule="micro_sam")),
        ("ours rule=micro_sam min_z_extent=2", Merge3DParams(rule="micro_sam", min_z_extent=2)),
        ("ours default: overlap beta=.4 max_gap=2 (scale .2) taper=.8 fill", Merge3DParams()),
        ("  ablation: max_gap_scale=0 (gap 2 always)", Merge3DParams(max_gap_scale=0)),
        ("  ablation: fill_gaps=False", Merge3DParams(fill_gaps=False)),
        ("  ablation: taper=0 (no waist test)", Merge3DParams(taper=0)),
        ("  ablation: taper=0.7", Merge3DParams(taper=0.7)),
        ("  ablation: taper=0.9", Merge3DParams(taper=0.9)),
        ("  ablation: max_gap=0", Merge3DParams(max_gap=0)),
        ("  ablation: max_gap=1", Merge3DParams(max_gap=1)),
        ("  ablation: max_gap=3", Merge3DParams(max_gap=3)),
        ("  ablation: beta=0.3", Merge3DParams(beta=0.3)),
        ("  ablation: beta=0.5", Merge3DParams(beta=0.5)),
        ("  ablation: min_z_extent=2", Merge3DParams(min_z_extent=2)),
    ]
    for name, p in variants:
        rows.append((name, score(lambda s, an, p=p: merge_slices_3d(s, replace(p, anisotropy=an)))))
    w = max(len(r[0]) for r in rows)
    print(f"\nmean mSA (perturbed: drop 10%, split 5%, mean over seeds {seeds}); "
          + ", ".join(f"{k}: {len(v[0])} volumes" for k, v in sets.items()))
    cols = [f"{k} {c}" for k in sets for c in ("clean", "pert")]
    print(f"{'rule / params':<{w}}  " + "  ".join(cols))
    for name, vals in rows:
        print(f"{name:<{w}}  " + "  ".join(f"{x:>{len(c)}.3f}" for x, c in zip(vals, cols)))
    for name, (gts, clean, _) in sets.items():
        t = time.perf_counter()
        for s in clean:
            merge_slices_3d(s)
        print(f"merge_slices_3d (default) per {name} volume {clean[0].shape}: "
              f"{(time.perf_counter() - t) / len(clean) * 1e3:.0f} ms")

    t = time.perf_counter()
    graph = synthetic_graph(args.nodes)
    t_build = time.perf_counter() - t
    for name, p in (("overlap (default)", Merge3DParams()), ("micro_sam", Merge3DParams(rule="micro_sam"))):
        t = time.perf_counter()
        lab = merge_nodes(*graph, params=p)
        dt = time.perf_counter() - t
        n_bad, n_bad_nodes = conflicts(graph, p)
        print(f"merge_nodes {name}: {len(graph[0]) - 1:,} nodes, {len(graph[2]):,} edges -> "
              f"{int(lab.max()):,} objects in {dt:.2f} s; solver on {n_bad:,} conflicted components "
              f"({n_bad_nodes:,} nodes); graph built in {t_build:.2f} s")


if __name__ == "__main__":
    main()
