"""Merge per-slice 2D instance segmentations into 3D objects (graph level, blockwise-friendly).

A volume segmented slice by slice gives 2D objects ("nodes") with ids unique across slices. Nodes in
different slices whose pixels overlap in yx get an edge weighted by the overlap; a multicut on these
edges groups the nodes into 3D objects. The core, :func:`merge_nodes`, works on the aggregated graph
only (node sizes, node slices, edge overlap counts), so a blockwise pipeline can sum overlap counts
block by block and never hold the volume. :func:`merge_slices_3d` is the in-memory reference.

Rules
-----
``rule="micro_sam"`` reproduces micro-sam 1.8.14 ``merge_instance_segmentation_3d(seg, beta=0.5,
with_background=True, gap_closing=None, min_z_extent=m)``: only consecutive slices (dz = 1), weight
``w = |a & b| / |a|`` normalised by the LOWER object, elf's ``compute_edge_costs(w)``
(``c = log((1 - p) / p)`` with ``p = 0.998 w + 0.001``) passed to the solver as ``1 - c`` -- so an
edge is attractive iff ``w > 1 / (1 + e) ~ 0.27`` -- and Kernighan-Lin per connected component of
the attractive edges (elf's ``multicut_decomposition``). micro-sam's ``beta`` never reaches the
costs (``compute_edge_costs`` is called with its default 0.5 and ``multicut_decomposition`` swallows
``beta`` in ``**kwargs``), so it is ignored here too; its background edges never exist (elf drops
label 0 on both sides), so there is nothing to reproduce for ``with_background``.

``rule="overlap"`` (default) fixes the weaknesses of that rule:

* symmetric weight ``w = |a & b| / min(|a|, |b|)`` (overlap coefficient): the small top slice (cap)
  of a nucleus above a big slice has w ~ 1 instead of ~0.1, and each half of a 2D object split in
  two is still covered by its neighbours;
* cost ``(logit(w) - logit(beta)) * min(|a|, |b|)``: elf's probability-to-cost transform with the
  boundary bias ``beta`` (attractive iff ``w > beta``), weighted by the pixels at stake so a few
  pixels of a tiny fragment cannot outvote the overlap of two large slices when a conflict
  (one object touching two) is resolved;
* skip edges across up to ``max_gap`` missing slices (dz = 2 .. max_gap + 1), used only where an
  object ends without an attractive dz = 1 partner (open ends): the lower node has none upwards and
  the upper node has none downwards. Elsewhere they would only chain stacked nuclei together;
* waist test (``taper``), a convexity prior: the cross-section area of a convex object along z is
  unimodal, so an object cannot narrow towards an edge from both sides. An attractive edge (u below,
  v above; direct or skip) is not used when u's area is < ``taper`` x the area of its attractive
  partners one slice down AND v's area is < ``taper`` x that of its partners one slice up -- the
  top cap of one nucleus touching the bottom cap of the next one. A node's area counts all pieces
  attached to the same partner, so the halves of a split 2D object do not look like a waist. A node at
  the minimum of the profile (a small cap under a bigger slice of the next object) can fail the test on
  both sides; only its weaker side is cut, so it stays with one of the two objects;
* the gap derives from the data (``max_gap_scale``, :func:`resolve_max_gap`): skip edges only where the
  objects span enough slices (expected z-extent from the 2D objects' sizes and the voxel anisotropy),
  since with coarse z a skip chains stacked objects.

The default ``beta=0.4`` lies between the overlap of two different touching objects (usually < 0.3)
and that of a 2D object split into halves whose split lines differ in neighbouring slices (~0.5);
with 0.5 such halves tie and Kernighan-Lin cuts them. beta, max_gap and taper were chosen by
measurement (``bench/merge3d.py``: real nuclei volumes and stacked synthetic nuclei).

Deviations from micro-sam
-------------------------
* micro-sam's ``gap_closing`` (a voxel-level binary closing along z BEFORE merging) is not part of the
  graph API; ``max_gap`` (skip edges) replaces it. The voxels of a missing 2D object cannot be
  recovered from a graph, so :func:`fill_z_gaps` (voxel level, needs a z-halo of ``max_gap``) fills
  runs of at most ``max_gap`` background slices between two voxels of the same 3D object after the
  merge; :func:`merge_slices_3d` applies it when ``fill_gaps`` (default on for ``rule="overlap"``).
  Unlike micro-sam's closing it never joins two different objects.
* micro-sam skips the ``min_z_extent`` filter when no edges exist at all, and drops the first object
  of a slice that has no background pixel (``np.unique(frame)[1:]``); neither quirk is reproduced.
* nodes that do not occur (size 0) get label 0; output labels are consecutive 1..K, ordered by the
  smallest node id of each 3D object (micro-sam returns the solver's raw labels).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components

RULES = ("overlap", "micro_sam")

_I64 = np.int64


@dataclass(frozen=True)
class Merge3DParams:
    """Parameters of the slice merge.

    rule: "overlap" (ours, see module docstring) or "micro_sam" (exact micro-sam parity, dz = 1 only).
    beta: boundary bias of "overlap": an edge is attractive iff its overlap coefficient > beta
        (higher = more splits). Ignored by "micro_sam", as in micro-sam.
    max_gap: link objects across up to this many missing slices ("overlap" only; 0 = off).
    taper: waist test of "overlap": drop an attractive edge when both ends shrink to below this
        fraction of their partners' area away from the edge (0 = off; for non-convex objects).
    min_z_extent: remove 3D objects whose z-extent (max z - min z + 1) is below this (0 = off).
    fill_gaps: merge_slices_3d only: fill gaps of <= max_gap slices inside each 3D object
        (:func:`fill_z_gaps`, "overlap" only).
    max_gap_scale: derive the gap from the data (0 = use max_gap as given): the gap used is
        min(max_gap, floor(max_gap_scale x D / anisotropy)), D = 90th percentile of the equivalent
        diameters (pixels) of the 2D objects, i.e. the expected z-extent in slices of a roughly
        isotropic object (:func:`resolve_max_gap`).
    anisotropy: z spacing / yx spacing of the volume (the NGFF scale); set by the workflow, not a
        config key.
    """
    rule: str = "overlap"
    beta: float = 0.4
    max_gap: int = 2
    taper: float = 0.8
    min_z_extent: int = 0
    fill_gaps: bool = True
    max_gap_scale: float = 0.2
    anisotropy: float = 1.0

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if not 0.0 < self.beta < 1.0:
            raise ValueError(f"beta must be in (0, 1), got {self.beta}")
        if self.max_gap < 0 or self.min_z_extent < 0 or self.taper < 0 or self.max_gap_scale < 0:
            raise ValueError("max_gap, taper, min_z_extent and max_gap_scale must be >= 0")
        if not self.anisotropy > 0:
            raise ValueError(f"anisotropy must be > 0, got {self.anisotropy}")

    @property
    def max_dz(self) -> int:
        """Largest slice distance of an edge this rule uses."""
        return 1 if self.rule == "micro_sam" else self.max_gap + 1


def resolve_max_gap(sizes: np.ndarray, params: Merge3DParams) -> Merge3DParams:
    """``params`` with the data-derived gap fixed (max_gap_scale 0 afterwards; idempotent).

    A skip edge across missing slices is only safe when the gap is short against the objects' z-extent:
    in a volume with coarse z (objects of 3-5 slices, stacked in z), a 2-slice skip chains the top of one
    nucleus to the bottom of the next one (synthetic, z spacing 5x yx: mSA 0.77 with max_gap 2, 0.97
    with 0). The expected z-extent comes from the 2D objects (first-pass statistics: their equivalent
    diameters, 90th percentile, robust to dropped and split slices) and the NGFF anisotropy."""
    if params.max_gap_scale <= 0 or params.rule != "overlap" or params.max_gap == 0:
        return params
    area = np.asarray(sizes, dtype=np.float64)[1:]
    area = area[area > 0]
    if area.size == 0:
        return replace(params, max_gap_scale=0.0)
    extent = np.percentile(2.0 * np.sqrt(area / np.pi), 90) / params.anisotropy
    gap = int(min(params.max_gap, np.floor(params.max_gap_scale * extent)))
    return replace(params, max_gap=gap, max_gap_scale=0.0)


def overlap_edges(lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, v, count): every pair of ids u in `lower` and v in `upper` (same-shaped int label arrays,
    0 = background excluded) that share pixels, with the number of shared pixels; sorted by (u, v)."""
    lower, upper = np.asarray(lower), np.asarray(upper)
    if lower.shape != upper.shape:
        raise ValueError(f"shape mismatch: {lower.shape} vs {upper.shape}")
    a = lower.ravel().astype(_I64, copy=False)
    b = upper.ravel().astype(_I64, copy=False)
    both = (a > 0) & (b > 0)
    a, b = a[both], b[both]
    if a.size == 0:
        return np.zeros(0, _I64), np.zeros(0, _I64), np.zeros(0, _I64)
    base = int(b.max()) + 1
    key, count = np.unique(a * base + b, return_counts=True)
    u, v = np.divmod(key, base)
    return u, v, count.astype(_I64)


def edge_costs(sizes: np.ndarray, node_z: np.ndarray, u: np.ndarray, v: np.ndarray, count: np.ndarray,
               params: Merge3DParams = Merge3DParams()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The multicut problem of :func:`merge_nodes`: (u, v, cost), positive cost = attractive.

    Edges are oriented lower -> upper, duplicates summed, edges the rule does not use dropped
    (node 0, absent nodes, dz outside 1..max_dz; for "overlap" attractive edges across a waist and
    skip edges that fail the open-end test)."""
    sizes = np.asarray(sizes, dtype=_I64)
    node_z = np.asarray(node_z, dtype=_I64)
    n = len(sizes)
    u, v, count = (np.asarray(x, dtype=_I64).ravel() for x in (u, v, count))
    if not len(u) == len(v) == len(count):
        raise ValueError("u, v and count must have the same length")
    if len(node_z) != n:
        raise ValueError("sizes and node_z must have the same length")
    if len(u) and (min(u.min(), v.min()) < 0 or max(u.max(), v.max()) >= n):
        raise ValueError("edge endpoint out of range 0..N-1")
    swap = node_z[u] > node_z[v]
    u, v = np.where(swap, v, u), np.where(swap, u, v)
    dz = node_z[v] - node_z[u]
    ok = (u > 0) & (v > 0) & (sizes[u] > 0) & (sizes[v] > 0) & (dz >= 1) & (dz <= params.max_dz) & (count > 0)
    u, v, count = u[ok], v[ok], count[ok]
    key, inv = np.unique(u * n + v, return_inverse=True)  # sorted; repeated pairs are summed
    count = np.bincount(inv.ravel(), weights=count, minlength=len(key)).astype(_I64)
    u, v = np.divmod(key, n)
    su, sv = sizes[u].astype(np.float64), sizes[v].astype(np.float64)
    if params.rule == "micro_sam":
        p_min = 0.001
        p_max = 1.0 - p_min
        p = (p_max - p_min) * (count / su) + p_min
        return u, v, 1.0 - (np.log((1.0 - p) / p) + np.log((1.0 - 0.5) / 0.5))
    smin = np.minimum(su, sv)
    p = np.clip(count / smin, 1e-3, 1.0 - 1e-3)
    cost = (np.log(p / (1.0 - p)) - np.log(params.beta / (1.0 - params.beta))) * smin
    skip = (node_z[v] - node_z[u]) > 1
    att = cost > 0
    drop = np.zeros(len(u), bool)
    if params.taper > 0:  # waist test (convexity prior), see the module docstring
        d = ~skip & att
        below = np.bincount(v[d], weights=su[d], minlength=n)  # area of a node's partners one slice down
        above = np.bincount(u[d], weights=sv[d], minlength=n)  # ... and one slice up
        # a node's area, at least that of all pieces sharing its partner below (above): split halves add up
        area_vs_below = sizes.astype(np.float64)
        area_vs_above = area_vs_below.copy()
        np.maximum.at(area_vs_below, v[d], above[u[d]])
        np.maximum.at(area_vs_above, u[d], below[v[d]])
        drop = att & (area_vs_below[u] < params.taper * below[u]) & (area_vs_above[v] < params.taper * above[v])
        drop = _one_cut_per_waist(n, u, v, cost, drop)
    if skip.any():
        d = ~skip & att & ~drop
        has_up = np.zeros(n, bool)
        has_down = np.zeros(n, bool)
        has_up[u[d]] = True
        has_down[v[d]] = True
        drop |= skip & (has_up[u] | has_down[v])
    keep = ~drop
    return u[keep], v[keep], cost[keep]


def _one_cut_per_waist(n: int, u: np.ndarray, v: np.ndarray, cost: np.ndarray, drop: np.ndarray) -> np.ndarray:
    """A node at the minimum of an area profile (the top cap of one object under a bigger bottom slice
    of the next) can fail the waist test on its edges downwards and upwards; cutting both would leave it
    alone. Keep the stronger side (the larger attractive cost) of such nodes, so the cut is made once."""
    if not drop.any():
        return drop
    down = np.full(n, -np.inf)  # strongest dropped edge from below, per node
    up = np.full(n, -np.inf)  # ... to above
    np.maximum.at(down, v[drop], cost[drop])
    np.maximum.at(up, u[drop], cost[drop])
    both = np.isfinite(down) & np.isfinite(up)
    restore = drop & ((both[v] & (down[v] >= up[v])) | (both[u] & (up[u] > down[u])))
    return drop & ~restore


def _multicut(n: int, u: np.ndarray, v: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Kernighan-Lin per attractive component (elf's multicut_decomposition) on a compact graph."""
    import bioimage_cpp.graph as bg
    import bioimage_cpp.graph.multicut as mc
    lo, hi = np.minimum(u, v), np.maximum(u, v)
    order = np.lexsort((hi, lo))  # from_unique_edges wants canonical, sorted edges
    uv = np.ascontiguousarray(np.stack([lo[order], hi[order]], axis=1), dtype=np.uint64)
    graph = bg.UndirectedGraph.from_unique_edges(n, uv)
    objective = mc.MulticutObjective(graph, np.ascontiguousarray(cost[order], dtype=np.float64))
    solver = mc.MulticutDecomposer(sub_solver=mc.KernighanLinMulticut(),
                                   fallthrough_solver=mc.KernighanLinMulticut(), number_of_threads=1)
    return np.asarray(solver.optimize(objective), dtype=_I64)


def merge_nodes(sizes: np.ndarray, node_z: np.ndarray, u: np.ndarray, v: np.ndarray, count: np.ndarray,
                params: Merge3DParams = Merge3DParams()) -> np.ndarray:
    """3D object label (int64, length N) of every node.

    Nodes are 0..N-1, node 0 = background (sizes[0] ignored); sizes = pixel count of each 2D object,
    node_z = its slice. Edges (u, v, count) connect nodes in different slices with `count` overlapping
    pixels (any order or orientation; repeated pairs are summed). Returns 0 for node 0, absent nodes
    (size 0) and objects removed by min_z_extent, else consecutive ids 1..K ordered by the smallest
    node id of each object. Components of attractive edges without an internal repulsive edge merge
    directly; only the conflicted ones go to the solver.
    """
    sizes = np.asarray(sizes, dtype=_I64)
    node_z = np.asarray(node_z, dtype=_I64)
    n = len(sizes)
    labels = np.zeros(n, _I64)
    if n <= 1:
        return labels
    params = resolve_max_gap(sizes, params)
    u, v, cost = edge_costs(sizes, node_z, u, v, count, params)
    att = cost > 0
    graph = sparse.coo_matrix((np.ones(int(att.sum()), np.int8), (u[att], v[att])), shape=(n, n))
    n_comp, comp = connected_components(graph, directed=False)
    comp = comp.astype(_I64)
    inside = comp[u] == comp[v]
    conflicted = np.zeros(n_comp, bool)
    conflicted[comp[u[inside & ~att]]] = True
    node_lab = comp
    sel = inside & conflicted[comp[u]]
    if sel.any():
        nodes = np.flatnonzero(conflicted[comp])
        local = np.full(n, -1, _I64)
        local[nodes] = np.arange(len(nodes))
        node_lab = comp.copy()
        node_lab[nodes] = n_comp + _multicut(len(nodes), local[u[sel]], local[v[sel]], cost[sel])
    present = sizes > 0
    present[0] = False
    idx = np.flatnonzero(present)
    if idx.size == 0:
        return labels
    obj, lab = np.unique(node_lab[idx], return_inverse=True)
    lab = lab.ravel()
    if params.min_z_extent > 0:
        z = node_z[idx]
        zmin = np.full(len(obj), np.iinfo(_I64).max)
        zmax = np.full(len(obj), np.iinfo(_I64).min)
        np.minimum.at(zmin, lab, z)
        np.maximum.at(zmax, lab, z)
        keep = (zmax - zmin + 1)[lab] >= params.min_z_extent
        idx, lab = idx[keep], lab[keep]
        if idx.size == 0:
            return labels
    _, first = np.unique(lab, return_index=True)  # idx is ascending: first = smallest node id
    rank = np.zeros(len(obj), _I64)
    rank[lab[first[np.argsort(idx[first], kind="stable")]]] = np.arange(1, len(first) + 1)
    labels[idx] = rank[lab]
    return labels


def slice_nodes(seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sizes, node_z) of a (Z, Y, X) label volume whose ids are unique across slices."""
    seg = np.asarray(seg)
    if seg.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) volume, got shape {seg.shape}")
    if seg.size and seg.min() < 0:
        raise ValueError("labels must be >= 0")
    n = int(seg.max()) + 1 if seg.size else 1
    sizes = np.bincount(seg.ravel().astype(_I64), minlength=n)
    ids = [np.unique(seg[z]) for z in range(seg.shape[0])]
    zs = np.repeat(np.arange(seg.shape[0]), [len(i) for i in ids])
    ids = np.concatenate(ids) if ids else np.zeros(0, _I64)
    fg = ids > 0
    if len(np.unique(ids[fg])) < int(fg.sum()):
        raise ValueError("2D object ids must be unique across slices (use relabel_slices)")
    node_z = np.zeros(n, _I64)
    node_z[ids[fg]] = zs[fg]
    return sizes, node_z


def merge_slices_3d(seg: np.ndarray, params: Merge3DParams = Merge3DParams()) -> np.ndarray:
    """In-memory reference: (Z, Y, X) slice labels, ids unique across slices (0 = bg) -> 3D labels.

    Overlap edges for dz = 1..max_dz, sizes by bincount, :func:`merge_nodes`, labels applied, then
    :func:`fill_z_gaps` if ``params.fill_gaps`` (rule "overlap", max_gap > 0)."""
    seg = np.asarray(seg)
    sizes, node_z = slice_nodes(seg)
    params = resolve_max_gap(sizes, params)
    parts = [overlap_edges(seg[z], seg[z + dz])
             for dz in range(1, params.max_dz + 1) for z in range(seg.shape[0] - dz)]
    if parts:
        u, v, c = (np.concatenate(x) for x in zip(*parts))
    else:
        u = v = c = np.zeros(0, _I64)
    out = merge_nodes(sizes, node_z, u, v, c, params)[seg]
    if params.fill_gaps and params.rule == "overlap" and params.max_gap > 0:
        out = fill_z_gaps(out, params.max_gap)
    return out


def fill_z_gaps(labels: np.ndarray, max_gap: int) -> np.ndarray:
    """Fill runs of at most `max_gap` background voxels along z (axis 0) that have the same object
    above and below -- the voxels of a 2D object missing in a slice. Never overwrites an object or
    joins two objects; a block needs a z-halo of max_gap slices."""
    lab = np.array(labels, copy=True)
    nz = lab.shape[0]
    for g in range(1, max_gap + 1):
        if nz < g + 2:
            break
        below, above = lab[:nz - g - 1], lab[g + 1:]
        fill = (below == above) & (below > 0)
        for k in range(g):
            fill &= lab[1 + k:nz - g + k] == 0
        for k in range(g):
            lab[1 + k:nz - g + k][fill] = below[fill]
    return lab


def relabel_slices(vol: np.ndarray, connectivity: int = 2) -> np.ndarray:
    """Destroy 3D identity: each 2D connected component of each object in each z-slice gets its own
    id (int64, consecutive, increasing with z). connectivity 2 = 8-neighbourhood in the slice."""
    from skimage.measure import label
    vol = np.asarray(vol)
    out = np.zeros(vol.shape, _I64)
    offset = 0
    for z in range(vol.shape[0]):
        lz = label(vol[z], connectivity=connectivity, background=0).astype(_I64)
        lz[lz > 0] += offset
        offset = max(offset, int(lz.max()))
        out[z] = lz
    return out


def perturb_slices(seg: np.ndarray, drop: float = 0.1, split: float = 0.05, seed: int = 0) -> np.ndarray:
    """Simulate 2D segmentation errors on slice labels (ids unique across slices): remove a random
    `drop` fraction of the 2D objects and cut another `split` fraction in two by a straight line
    through the centroid at a random angle (the second half gets a new id). Deterministic in seed."""
    rng = np.random.default_rng(seed)
    seg = np.array(seg, dtype=_I64)
    ids = np.unique(seg)
    ids = ids[ids > 0]
    perm = rng.permutation(ids)
    n_drop, n_split = int(round(drop * len(ids))), int(round(split * len(ids)))
    to_split = perm[n_drop:n_drop + n_split]
    angle = rng.uniform(0.0, np.pi, n_split)
    n = int(seg.max()) + 1
    seg[np.isin(seg, perm[:n_drop])] = 0
    which = np.full(n, -1, _I64)
    which[to_split] = np.arange(n_split)
    flat = seg.reshape(-1)
    pix = np.flatnonzero(which[flat] >= 0)
    k = which[flat[pix]]
    coords = np.unravel_index(pix, seg.shape)
    y, x = coords[-2].astype(np.float64), coords[-1].astype(np.float64)
    cnt = np.maximum(np.bincount(k, minlength=n_split), 1)
    cy = np.bincount(k, weights=y, minlength=n_split) / cnt
    cx = np.bincount(k, weights=x, minlength=n_split) / cnt
    side = (y - cy[k]) * np.cos(angle[k]) - (x - cx[k]) * np.sin(angle[k]) > 0
    flat[pix[side]] = n + k[side]
    return seg
