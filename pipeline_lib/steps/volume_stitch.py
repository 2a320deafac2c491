"""Passes 2 and 3 over a volume: collect the "same object" evidence block by block, then solve it globally.

Pass 2 (per batch of slabs, after every block of pass 1 exists): the piece counts of all blocks give the
compact global ids; per slab it matches pieces of neighbouring tiles by halo overlap (yx stitching), counts
overlaps between pieces of slices z and z + dz (dz = 1 .. max_gap + 1, reading slices past the slab) and the
size of every piece. Pass 3 (one job): union of the yx matches gives the 2D objects, their z overlaps are
summed, the 3D merge (``stitch.merge3d``) decides which 2D objects form one 3D object, and the result is a
compact lookup table piece id -> final id (``lut.npy``), read by pass 4 one contiguous range per batch.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import zarr
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from ..io.ome_zarr import read_json, write_atomic, write_json_atomic
from ..stitch.merge3d import merge_nodes, overlap_edges, resolve_max_gap
from ..stitch.tile_match import band_matches, intersect
from ..stitch.volume_grid import VolumeGrid, unit_offsets
from .volume_plan import anisotropy, plan_grid
from .volume_segment import block_path


def gather_counts(grid: VolumeGrid, segment_jsons: Sequence[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """Pieces per unit (n_slabs, n_tiles, z_block) from the pass-1 markers, and the status of every block."""
    counts = grid.counts_array()
    status: dict[str, Any] = {}
    for p in segment_jsons:
        for name, b in read_json(p)["blocks"].items():
            s, t = int(name[1:6]), int(name[8:])
            counts[s, t, :len(b["counts"])] = b["counts"]
            status[name] = b
    return counts, status


def _slab_matches(plan: dict[str, Any], grid: VolumeGrid, scratch: Any, s: int, off: np.ndarray,
                  counts: np.ndarray, threshold: float) -> np.ndarray:
    """Global id pairs of pieces joined across tile seams within slab ``s``."""
    z0, z1 = grid.slab(s)
    out = []
    for i, j in grid.neighbour_pairs():
        a, b = grid.tiles[i], grid.tiles[j]
        reg_b = intersect(a.outer, b.inner)  # A's halo inside B
        reg_a = intersect(b.outer, a.inner)  # B's halo inside A
        if reg_a is None or reg_b is None:
            continue
        with np.load(block_path(plan, grid.block_name(s, i))) as fa, \
                np.load(block_path(plan, grid.block_name(s, j))) as fb:
            ring_a, ring_b = fa[f"to_{j}"], fb[f"to_{i}"]
        in_b = np.asarray(scratch[(slice(z0, z1),) + reg_b])
        in_a = np.asarray(scratch[(slice(z0, z1),) + reg_a])
        for k in range(z1 - z0):
            view_a = np.concatenate([ring_a[k].ravel(), in_a[k].ravel()])
            view_b = np.concatenate([in_b[k].ravel(), ring_b[k].ravel()])
            m = band_matches(view_a, view_b, int(counts[s, i, k]), int(counts[s, j, k]), threshold)
            if len(m):
                out.append(np.stack([m[:, 0] + off[s, i, k], m[:, 1] + off[s, j, k]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def _global_slices(grid: VolumeGrid, scratch: Any, t: int, z0: int, z1: int, off: np.ndarray) -> np.ndarray:
    """Global piece ids of tile ``t`` (inner) for slices z0..z1-1 (int64)."""
    return grid.global_ids(np.asarray(scratch[(slice(z0, z1),) + grid.tiles[t].inner]), off, t, z0)


def run_volume_edges_batch(cfg: dict[str, Any], plan: dict[str, Any], batch: str, segment_jsons: Sequence[str],
                           out_npz: str) -> dict[str, Any]:
    """Pass 2 for the slabs of ``batch``: yx matches, z overlaps and piece sizes, saved as one npz."""
    grid = plan_grid(plan)
    counts, _ = gather_counts(grid, segment_jsons)
    off, _ = unit_offsets(counts)
    scratch = zarr.open_array(os.path.join(plan["scratch"], "pieces.zarr"), mode="r")
    reach = cfg["volume"]["merge"]["max_gap"] + 1
    Z = grid.shape[0]
    yx, zu, zv, zc, pid, psize, pz = [], [], [], [], [], [], []
    t0 = time.time()
    for s in tqdm(plan["batches"][batch], desc=f"stitch evidence {batch}", unit="slab", file=sys.stderr):
        z0, z1 = grid.slab(s)
        yx.append(_slab_matches(plan, grid, scratch, s, off, counts, cfg["volume"]["match_threshold"]))
        for t in range(grid.n_tiles):
            ids = _global_slices(grid, scratch, t, z0, min(z1 + reach, Z), off)
            for k, z in enumerate(range(z0, z1)):
                n = int(counts[s, t, k])
                if n:
                    loc = np.where(ids[k] > 0, ids[k] - off[s, t, k], 0).ravel()
                    pid.append(np.arange(off[s, t, k] + 1, off[s, t, k] + n + 1, dtype=np.int64))
                    psize.append(np.bincount(loc, minlength=n + 1)[1:n + 1])
                    pz.append(np.full(n, z, dtype=np.int64))
                for dz in range(1, reach + 1):
                    if k + dz < len(ids):
                        u, v, c = overlap_edges(ids[k], ids[k + dz])
                        zu.append(u), zv.append(v), zc.append(c)
    cat = (lambda xs, dt=np.int64: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    yx_pairs = np.concatenate(yx) if yx else np.zeros((0, 2), np.int64)
    write_atomic(out_npz, lambda p: np.savez_compressed(p, yx=yx_pairs, u=cat(zu), v=cat(zv), count=cat(zc),
                                                        piece=cat(pid), size=cat(psize), z=cat(pz)))
    return {"n_yx": len(yx_pairs), "n_z": int(sum(len(x) for x in zu)), "seconds": time.time() - t0}


def _union(n: int, pairs: np.ndarray) -> np.ndarray:
    """Component id per node 0..n-1 (node 0, the background, stays alone as component 0)."""
    if len(pairs) == 0:
        return np.arange(n, dtype=np.int64)
    g = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(g, directed=False)
    return comp.astype(np.int64)  # components are numbered in order of their first node: comp[0] == 0


def run_volume_merge(cfg: dict[str, Any], plan: dict[str, Any], segment_jsons: Sequence[str],
                     edge_npzs: Sequence[str], out_lut: str, out_json: str) -> dict[str, Any]:
    """Pass 3: the global solve. Memory is proportional to the number of 2D pieces, not to voxels."""
    from ..config import merge3d_params
    t0 = time.time()
    grid = plan_grid(plan)
    counts, _ = gather_counts(grid, segment_jsons)
    _, n_ids = unit_offsets(counts)
    sizes = np.zeros(n_ids, np.int64)
    node_z = np.zeros(n_ids, np.int64)
    yx, zu, zv, zc = [], [], [], []
    for p in edge_npzs:
        with np.load(p) as f:
            sizes[f["piece"]] = f["size"]
            node_z[f["piece"]] = f["z"]
            yx.append(f["yx"]), zu.append(f["u"]), zv.append(f["v"]), zc.append(f["count"])
    yx_pairs = np.concatenate(yx) if yx else np.zeros((0, 2), np.int64)
    obj = _union(n_ids, yx_pairs)
    n_obj = int(obj.max()) + 1
    obj_size = np.bincount(obj, weights=sizes, minlength=n_obj).astype(np.int64)
    obj_z = np.zeros(n_obj, np.int64)
    obj_z[obj] = node_z
    u, v, c = (np.concatenate(x) if x else np.zeros(0, np.int64) for x in (zu, zv, zc))
    U, V = obj[u], obj[v]
    key, inv = np.unique(U * n_obj + V, return_inverse=True)
    C = np.bincount(inv.ravel(), weights=c, minlength=len(key)).astype(np.int64)
    U, V = np.divmod(key, n_obj)
    params = resolve_max_gap(obj_size, replace(merge3d_params(cfg), anisotropy=anisotropy(plan)))
    labels3d = merge_nodes(obj_size, obj_z, U, V, C, params)
    lut = labels3d[obj]
    n_final = int(lut.max()) if lut.size else 0
    if n_final >= 2**32:
        raise ValueError(f"{n_final} objects do not fit the uint32 label image; split the volume.")
    write_atomic(out_lut, lambda p: np.save(p, lut.astype(np.uint32)))
    info = {"n_pieces": n_ids - 1, "n_yx_joins": int(len(yx_pairs)), "n_objects_2d": n_obj - 1,
            "n_z_edges": int(len(key)), "n_objects": n_final, "max_gap": params.max_gap,
            "anisotropy": params.anisotropy, "seconds": round(time.time() - t0, 3)}
    write_json_atomic(out_json, info)
    return info
