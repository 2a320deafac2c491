"""Passes 2 and 3 over a volume: collect the "same object" evidence block by block, then solve it globally.

Pass 2 (per batch of blocks, after the pass-1 blocks it reads exist), in job-local compact ids: per block it
matches pieces of neighbouring tiles by halo overlap (yx stitching), counts overlaps between pieces of slices
z and z + dz (dz = 1 .. max_gap + 1, reading slices past the slab) and the size of every piece. Pass 3 (one job): union of the yx matches gives the 2D objects, their z overlaps are
summed, the 3D merge (``stitch.merge3d``) decides which 2D objects form one 3D object, and the result is a
compact lookup table piece id -> final id (``lut.npy``), read memory-mapped by pass 4, block by block.
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
from ..stitch.volume_grid import LocalIds, VolumeGrid, unit_key, unit_offsets
from .volume_plan import anisotropy, batch_blocks, plan_grid
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


def _block_counts(plan: dict[str, Any], grid: VolumeGrid, blocks: set[tuple[int, int]]) -> dict[int, int]:
    """Pieces per unit key of ``blocks``, from their block files (written by pass 1, failed blocks too)."""
    out: dict[int, int] = {}
    for s, t in blocks:
        with np.load(block_path(plan, grid.block_name(s, t))) as f:
            for dz, n in enumerate(f["counts"]):
                out[unit_key(grid, s, t, dz)] = int(n)
    return out


def _block_matches(plan: dict[str, Any], grid: VolumeGrid, scratch: Any, s: int, i: int, loc: LocalIds,
                   counts: dict[int, int], threshold: float) -> list[np.ndarray]:
    """Job-local id pairs of pieces of tile ``i`` joined with a higher-numbered neighbour, within slab ``s``."""
    z0, z1 = grid.slab(s)
    out = []
    for j in (j for j in grid.neighbours(i) if j > i):
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
            ka, kb = unit_key(grid, s, i, k), unit_key(grid, s, j, k)
            view_a = np.concatenate([ring_a[k].ravel(), in_a[k].ravel()])
            view_b = np.concatenate([in_b[k].ravel(), ring_b[k].ravel()])
            m = band_matches(view_a, view_b, counts.get(ka, 0), counts.get(kb, 0), threshold)
            if len(m):
                out.append(np.stack([m[:, 0] + loc.offset(ka), m[:, 1] + loc.offset(kb)], axis=1))
    return out


def run_volume_edges_batch(cfg: dict[str, Any], plan: dict[str, Any], batch: str, segment_jsons: Sequence[str],
                           out_npz: str) -> dict[str, Any]:
    """Pass 2 for the blocks of ``batch``: yx matches, z overlaps and piece sizes, saved as one npz in
    job-local ids (``keys``/``offsets``: see ``LocalIds``). It reads only the blocks of ``VolumeGrid.evidence_reads``, so a
    rerun of one pass-1 batch redoes only the edge jobs that read its blocks (``volume_plan.edge_inputs``);
    ``segment_jsons`` are those jobs' markers (dependencies only)."""
    grid = plan_grid(plan)
    blocks = batch_blocks(plan, batch)
    reach = cfg["volume"]["merge"]["max_gap"] + 1
    counts = _block_counts(plan, grid, set().union(*(grid.evidence_reads(s, t, reach) for s, t in blocks)))
    loc = LocalIds.from_counts(counts)
    scratch = zarr.open_array(os.path.join(plan["scratch"], "pieces.zarr"), mode="r")
    Z = grid.shape[0]
    yx, zu, zv, zc, pid, psize, pz = [], [], [], [], [], [], []
    t0 = time.time()
    for s, t in tqdm(blocks, desc=f"stitch evidence {batch}", unit="block", file=sys.stderr):
        z0, z1 = grid.slab(s)
        yx += _block_matches(plan, grid, scratch, s, t, loc, counts, cfg["volume"]["match_threshold"])
        ids = loc.ids(grid, np.asarray(scratch[(slice(z0, min(z1 + reach, Z)),) + grid.tiles[t].inner]), t, z0)
        for k, z in enumerate(range(z0, z1)):
            key = unit_key(grid, s, t, k)
            n = counts.get(key, 0)
            if n:
                o = loc.offset(key)
                lab = np.where(ids[k] > 0, ids[k] - o, 0).ravel()
                pid.append(np.arange(o + 1, o + n + 1, dtype=np.int64))
                psize.append(np.bincount(lab, minlength=n + 1)[1:n + 1])
                pz.append(np.full(n, z, dtype=np.int64))
            for dz in range(1, reach + 1):
                if k + dz < len(ids):
                    u, v, c = overlap_edges(ids[k], ids[k + dz])
                    zu.append(u), zv.append(v), zc.append(c)
    cat = (lambda xs, dt=np.int64: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    yx_pairs = np.concatenate(yx) if yx else np.zeros((0, 2), np.int64)
    write_atomic(out_npz, lambda p: np.savez_compressed(p, yx=yx_pairs, u=cat(zu), v=cat(zv), count=cat(zc),
                                                        piece=cat(pid), size=cat(psize), z=cat(pz),
                                                        keys=loc.keys, offsets=loc.offsets))
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
    off, _ = unit_offsets(counts)
    flat = off.ravel()
    for p in edge_npzs:
        with np.load(p) as f:
            loc = LocalIds(f["keys"], f["offsets"])
            piece = loc.to_global(f["piece"], flat)
            sizes[piece] = f["size"]
            node_z[piece] = f["z"]
            yx.append(loc.to_global(f["yx"], flat).reshape(-1, 2)), zc.append(f["count"])
            zu.append(loc.to_global(f["u"], flat)), zv.append(loc.to_global(f["v"], flat))
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
