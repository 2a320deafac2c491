"""Cellpose's flows -> masks made blockwise-exact (``cellpose.exact: true``): blocks == the whole field.

Cellpose 4.2's ``dynamics.compute_masks`` depends on the window it runs on, so blocks with a halo differ from
the whole image by a few boundary pixels. This module runs the same steps as ``resize_and_compute_masks``
(Euler integration of ``dP / 5`` over the pixels with ``cellprob > cellprob_threshold``, histogram seeds,
seed expansion, the flow-error check, hole filling and ``min_size``) with every step a function of the
field coordinates of the pixels involved and of the field shape only, never of the block. Where it differs
from cellpose on the whole field, and why:

1. **Euler steps** use cellpose's ``steps_interp`` arithmetic on the *field* (float32 positions normalised to
   [-1, 1] by the field shape, the flow read where ``grid_sample(align_corners=False)`` reads it, zero
   padding outside the field, clamped to [-1, 1], truncated at the end), computed per pixel from its field
   coordinates, so any block repeats it. The bilinear weights are ours (not bit-identical to
   ``grid_sample``'s kernel: ulp-level differences). A pixel whose path needs the flow outside the block
   (inside the field) is *escaped*: left out of the histogram and labelled 0 (untiled, nothing escapes).
2. **Seeds** as ``get_masks_torch`` (local maxima of the 5 x 5 max-pool with more than 10 pixels, each grown
   5 times in its 11 x 11 window through bins with more than 2 pixels, overlaps to the seed with more
   pixels), with ties between seeds of equal count broken by position (cellpose's ``argsort`` is unstable).
3. **Flow-error check** as ``remove_bad_flow_masks`` / ``masks_to_flows_gpu`` (heat diffusion from each
   mask's centre pixel, gradients read across touching masks as cellpose does, unit flows, mean squared error
   against ``dP / 5``), but each mask diffuses for its own ``2 * (bbox height + width + 2)`` steps; cellpose
   uses the largest mask of its window for all of them. Heat is always float64 (cellpose switches to float32
   above 4e7 pixels).
4. **``max_size_fraction``** is applied to the *field* area after hole filling and ``min_size`` (and, blockwise,
   after stitching, with the areas the stitching already counts), not to the window before the flow check.

Blocks equal the untiled result when the halo covers every path that matters: objects that reach into a
block's inner region, the objects touching them, and the pixels that end within 10 px of their seeds must
have paths inside the block. Sufficient: ``halo >= 2 * D + 3 * T + 13`` with ``D`` the largest object
diameter and ``T`` the farthest a pixel travels; as pixels travel to their own object's centre (``T`` about
``D / 2``) about ``2 * D`` is enough in practice (the tests check several block and halo choices).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

RPAD = 5  # histogram border: seeds lie on pixels, their 11 x 11 windows reach 5 beyond


def _cell_table(im: torch.Tensor) -> torch.Tensor:
    """(h + 1) * (w + 1) x 8: per cell (its top-left pixel, from -1) the flow (both components) at its four
    corners y0x0, y0x1, y1x0, y1x1, with zeros beyond the block (grid_sample's zero padding)."""
    h, w = im.shape[1:]
    pad = F.pad(im[None], (1, 1, 1, 1))[0]
    corners = torch.stack([pad[:, :-1, :-1], pad[:, :-1, 1:], pad[:, 1:, :-1], pad[:, 1:, 1:]])  # (4, 2, h+1, w+1)
    return corners.permute(2, 3, 0, 1).reshape((h + 1) * (w + 1), 8).contiguous()


def follow_flows_exact(dP: torch.Tensor, starts: torch.Tensor, niter: int, origin: tuple[int, int] = (0, 0),
                       field: tuple[int, int] | None = None, check_every: int = 8,
                       stats: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Final integer positions (N, 2) (block coordinates) of ``starts`` (N, 2) after ``niter`` Euler steps of
    ``dP`` ((2, h, w) float32, the step in pixels: ``dP / 5`` masked by ``cellprob``), and which of them
    escaped the block (module docstring, 1).

    cellpose's ``steps_interp`` arithmetic on the *field* (positions normalised to [-1, 1] by the field
    shape, sampled as ``grid_sample(align_corners=False)`` with zero padding reads them, clamped to [-1, 1]),
    computed per pixel from its field coordinates only, so a block at any offset repeats the untiled
    computation. The flow comes from the block: one gather per step of the cell's four corners. A pixel
    that needs a corner outside the block but inside the field is *escaped*. The step is a fixed map of the
    state, so a pixel whose state equals its value two steps before is periodic (a fixed point or a
    2-cycle): its final state is known exactly and it leaves the active set (checked every
    ``check_every`` steps). Only separate elementwise ops (no fused multiply-add, whose rounding could
    depend on the position in the array)."""
    h, w = dP.shape[1:]
    field = field or (h, w)
    dev = dP.device
    L = np.asarray(field, np.float64)
    o = torch.as_tensor(origin, dtype=torch.int64, device=dev)
    im = dP.clone()
    for k in range(2):  # cellpose: im[:, k] *= 2. / (L - 1) (in float32), pt = 2 * p / (L - 1) - 1
        im[k] *= 2.0 / (L[k] - 1)
    table = _cell_table(im)
    s = starts.to(dev, torch.int64)
    pt = (s + o).to(torch.float32)
    for k in range(2):
        pt[:, k] /= L[k] - 1
    pt = pt * 2 - 1
    half = torch.as_tensor((L / 2).astype(np.float32), device=dev)  # grid_sample: ix = (x + 1) * L / 2 - 0.5
    size = torch.tensor([h, w], dtype=torch.int64, device=dev)
    minus1 = torch.full_like(size, -1)
    stride = torch.tensor([w + 1, 1], dtype=torch.int64, device=dev)
    inner_lo = o > 0  # block sides inside the field: corners beyond them are unknown
    inner_hi = o + size < torch.as_tensor(field, dtype=torch.int64, device=dev)
    final = torch.zeros_like(pt)
    escaped = torch.zeros(len(s), dtype=torch.bool, device=dev)
    idx = torch.arange(len(s), device=dev)  # the active pixels
    p1 = pt
    big = torch.iinfo(torch.int64).max
    low = torch.full_like(s, big)
    high = torch.full_like(s, -big)

    def escapes(lo_, hi_):
        return ((inner_lo & (lo_ < 0)) | (inner_hi & (hi_ + 1 > size - 1))).any(dim=1)

    niter = int(niter)
    for t in range(1, niter + 1):
        ix = (pt + 1) * half - 0.5
        fl = torch.floor(ix)
        frac = ix - fl
        j = fl.to(torch.int64) - o  # the cell in block coordinates (from -1)
        low, high = torch.minimum(low, j), torch.maximum(high, j)
        j = torch.clamp(j, minus1, size - 1)  # an escaped pixel reads a wrong cell; its result is discarded
        c = torch.index_select(table, 0, ((j + 1) * stride).sum(dim=1))  # (n, 8)
        ty, tx = frac[:, :1], frac[:, 1:]
        uy, ux = 1 - ty, 1 - tx
        v = (c[:, 0:2] * (uy * ux) + c[:, 2:4] * (uy * tx)) + (c[:, 4:6] * (ty * ux) + c[:, 6:8] * (ty * tx))
        p2, p1 = p1, pt
        pt = torch.clamp(pt + v, -1.0, 1.0)
        if t >= 2 and t % check_every == 0 and t < niter:
            done = (pt == p2).all(dim=1)  # periodic: state_niter = state_t or state_(t-1) by parity
            if done.any():
                i = idx[done]
                final[i] = pt[done] if (niter - t) % 2 == 0 else p1[done]
                escaped[i] = escapes(low[done], high[done])
                keep = ~done
                idx, pt, p1, low, high = idx[keep], pt[keep], p1[keep], low[keep], high[keep]
            if stats is not None:
                stats.setdefault("active", []).append(len(idx))
    final[idx] = pt
    escaped[idx] = escapes(low, high)
    out = (final + 1) * 0.5
    for k in range(2):  # cellpose: pt *= (L - 1), then .int()
        out[:, k] *= L[k] - 1
    return out.to(torch.int64) - o, escaped


def _max_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.max_pool2d(x[None].float(), k, stride=1, padding=k // 2)[0]


def seed_labels(pos: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Seed ids (1.., 0 = none) at the final positions ``pos`` (N, 2) of a (h, w) block: cellpose's
    ``get_masks_torch`` histogram, seeds and seed expansion (module docstring, 2)."""
    h, w = shape
    H, W = h + 2 * RPAD, w + 2 * RPAD
    flat = (pos[:, 0] + RPAD) * W + pos[:, 1] + RPAD
    hist = torch.bincount(flat, minlength=H * W).reshape(H, W)
    hmax = _max_pool(hist[None], 5)[0]
    seeds = torch.nonzero((hist.float() >= hmax) & (hist > 10))  # raster order
    if len(seeds) == 0:
        return torch.zeros(len(pos), dtype=torch.int64, device=pos.device)
    sflat = seeds[:, 0] * W + seeds[:, 1]
    order = torch.sort(hist.reshape(-1)[sflat], stable=True).indices  # by count, ties by position
    sflat = sflat[order]
    r = torch.arange(-5, 6, device=pos.device)
    win = (r[:, None] * W + r[None, :]).reshape(-1)
    idx = sflat[:, None] + win[None, :]  # (n, 121)
    allowed = (hist.reshape(-1)[idx] > 2).reshape(-1, 11, 11).float()
    grow = torch.zeros_like(allowed)
    grow[:, 5, 5] = 1
    for _ in range(5):
        grow = _max_pool(grow, 3) * allowed
    k, j = torch.nonzero(grow.reshape(len(sflat), -1), as_tuple=True)
    m = torch.zeros(H * W, dtype=torch.int64, device=pos.device)
    m.scatter_reduce_(0, idx[k, j], k + 1, reduce="amax", include_self=False)
    return m[flat]


def _bounds(ys: np.ndarray, xs: np.ndarray, lab: np.ndarray, n: int, big: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per label 0..n: (ymin, xmin, ymax, xmax) of its pixels; ``big`` / -1 for labels without pixels."""
    ymin, xmin = np.full(n + 1, big, np.int64), np.full(n + 1, big, np.int64)
    ymax, xmax = np.full(n + 1, -1, np.int64), np.full(n + 1, -1, np.int64)
    np.minimum.at(ymin, lab, ys)
    np.minimum.at(xmin, lab, xs)
    np.maximum.at(ymax, lab, ys)
    np.maximum.at(xmax, lab, xs)
    return ymin, xmin, ymax, xmax


def _centres(ys: np.ndarray, xs: np.ndarray, lab: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per label 1..n (all present): the diffusion centre (cellpose's ``center_of_mass``: the pixel nearest
    the rounded mean, first in raster order) and the bbox extent ``h + w + 2`` (``get_centers``)."""
    cnt = np.bincount(lab, minlength=n + 1)[1:]
    ymin, xmin, ymax, xmax = _bounds(ys, xs, lab, n, np.iinfo(np.int64).max)
    ly, lx = ys - ymin[lab], xs - xmin[lab]
    ym = np.round(np.bincount(lab, ly, n + 1)[1:] / cnt).astype(np.int64)
    xm = np.round(np.bincount(lab, lx, n + 1)[1:] / cnt).astype(np.int64)
    dist = (lx - xm[lab - 1]) ** 2 + (ly - ym[lab - 1]) ** 2
    order = np.lexsort((np.arange(len(lab)), dist, lab))  # per label: nearest, then raster order
    first = order[np.searchsorted(lab[order], np.arange(1, n + 1))]
    ext = (ymax - ymin + 1)[1:] + (xmax - xmin + 1)[1:] + 2
    return first, ext


def mask_flows(labels: np.ndarray, device: str | torch.device = "cpu") -> np.ndarray:
    """(2, h, w) float64 unit flows of consecutive ``labels`` (1..n) as cellpose's ``masks_to_flows_gpu``,
    with each mask diffused for its own ``2 * ext`` steps (module docstring, 3)."""
    h, w = labels.shape
    n = int(labels.max())
    pad = np.pad(labels.astype(np.int64), 1)
    W = w + 2
    ys, xs = np.nonzero(pad)
    lab = pad[ys, xs]
    first, ext = _centres(ys, xs, lab, n)
    steps = 2 * ext[lab - 1]
    order = np.argsort(-steps, kind="stable")  # active pixels are a prefix at every step
    ys, xs, lab, steps = ys[order], xs[order], lab[order], steps[order]
    first = np.argsort(order)[first]
    dy = np.array([0, -1, 1, 0, 0, -1, -1, 1, 1])
    dx = np.array([0, 0, 0, -1, 1, -1, 1, -1, 1])
    nb = (ys[None] + dy[:, None]) * W + xs[None] + dx[:, None]  # (9, N) flat indices into the padded image
    # a neighbour of another mask reads the padded corner (background, never updated: 0), as cellpose's
    # ``Tneigh * isneighbor``; the gradients below read the true neighbours, as cellpose's do
    nb_diff = np.where(pad.reshape(-1)[nb] == lab[None], nb, 0)
    dev = torch.device(device)
    nb_t = torch.from_numpy(nb).to(dev)
    rows = [torch.from_numpy(np.ascontiguousarray(r)).to(dev) for r in nb_diff]
    T = torch.zeros(pad.size, dtype=torch.float64, device=dev)
    meds = nb_t[0, torch.from_numpy(first).to(dev)]
    med_steps = steps[first]
    med_order = np.argsort(-med_steps, kind="stable")
    meds, med_steps = meds[torch.from_numpy(med_order).to(dev)], med_steps[med_order]
    n_steps = int(steps[0]) if len(steps) else 0
    act = np.searchsorted(-steps, -np.arange(n_steps), side="left")  # pixels with steps > t (a prefix)
    act_m = np.searchsorted(-med_steps, -np.arange(n_steps), side="left")
    for t in range(n_steps):
        k, km = int(act[t]), int(act_m[t])
        T[meds[:km]] += 1
        acc = torch.index_select(T, 0, rows[0][:k])
        for r in rows[1:]:
            acc = acc + torch.index_select(T, 0, r[:k])
        T[rows[0][:k]] = acc / 9
    grads = T[nb_t[[2, 1, 4, 3]]].cpu().numpy()
    mu = np.stack([grads[0] - grads[1], grads[2] - grads[3]])
    mu /= 1e-60 + (mu ** 2).sum(axis=0) ** 0.5
    out = np.zeros((2, h, w))
    out[:, ys - 1, xs - 1] = mu
    return out


def remove_bad_flow_masks(labels: np.ndarray, dP: np.ndarray, threshold: float,
                          device: str | torch.device = "cpu") -> np.ndarray:
    """``labels`` (consecutive) without the masks whose mean squared flow error exceeds ``threshold``."""
    n = int(labels.max())
    if n == 0:
        return labels
    mu = mask_flows(labels, device)
    err = ((mu - dP / np.float32(5.0)) ** 2).sum(axis=0).ravel()
    lab = labels.ravel()
    fg = lab > 0
    merr = np.bincount(lab[fg], err[fg], n + 1)[1:] / np.bincount(lab[fg], minlength=n + 1)[1:]
    keep = np.concatenate([[0], np.where(merr > threshold, 0, np.arange(1, n + 1))])
    return renumber(keep[labels])


def renumber(labels: np.ndarray) -> np.ndarray:
    """Consecutive ids 1..n in the order of the old ids (0 stays 0)."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, np.int64)
    lut[ids] = np.arange(1, len(ids) + 1)
    return lut[labels]


def _remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    cnt = np.bincount(labels.ravel())
    lut = np.arange(len(cnt))
    lut[cnt < min_size] = 0
    lut[0] = 0
    return renumber(lut[labels])


def fill_holes(labels: np.ndarray) -> np.ndarray:
    """Every mask with its holes filled (4-connected background enclosed by the mask within its bounding
    box, as ``fill_voids.fill`` per mask in cellpose's ``fill_holes_and_remove_small_masks``): all masks'
    boxes packed side by side into one canvas with a 1-pixel frame, one ``binary_fill_holes``. A pixel in
    holes of several masks (nested) goes to the outermost, as cellpose's per-mask loop leaves it."""
    n = int(labels.max())
    if n == 0:
        return labels
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs]
    ymin, xmin, ymax, xmax = _bounds(ys, xs, lab, n, max(labels.shape))
    present = ymax >= 0
    bh = np.where(present, ymax - ymin + 1, 0)
    bw = np.where(present, xmax - xmin + 1, 0)
    col = np.concatenate([[0], np.cumsum(bw[1:] + 1)])  # box k at columns col[k-1]+1 .. (frame between boxes)
    left = col[:-1] + 1
    canvas = np.zeros((int(bh.max()) + 2, int(col[-1]) + 1), bool)
    canvas[ys - ymin[lab] + 1, xs - xmin[lab] + left[lab - 1]] = True
    holes = ndi.binary_fill_holes(canvas) & ~canvas
    if not holes.any():
        return labels
    comp, _ = ndi.label(holes)
    size = np.bincount(comp.ravel())
    cy, cx = np.nonzero(holes)
    owner = np.searchsorted(left, cx, side="right")  # box (label) of each canvas column
    y = cy - 1 + ymin[owner]
    x = cx - left[owner - 1] + xmin[owner]
    flat = y * labels.shape[1] + x
    order = np.lexsort((size[comp[cy, cx]], flat))  # per pixel, its largest (outermost) hole last
    last = np.r_[flat[order][1:] != flat[order][:-1], True]
    out = labels.copy()
    out.reshape(-1)[flat[order][last]] = owner[order][last]
    return out


def fill_and_remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """cellpose's ``fill_holes_and_remove_small_masks``: drop masks under ``min_size``, fill holes, drop again."""
    if min_size > 0:
        labels = _remove_small(labels, min_size)
    labels = renumber(fill_holes(labels))
    if min_size > 0:
        labels = _remove_small(labels, min_size)
    return labels


def exact_block_masks(flows: np.ndarray, params: Any, origin: tuple[int, int] = (0, 0),
                      field: tuple[int, int] | None = None, device: str | torch.device = "cpu") -> np.ndarray:
    """(h, w) uint32 labels (consecutive) of one block's (3, h, w) flows at ``origin`` of a ``field`` (shape;
    None = the block is the field), without the ``max_size_fraction`` rule (that is field-wide:
    :func:`drop_large`). Identical for a pixel at any block offset (module docstring)."""
    flows = np.asarray(flows, np.float32)
    dP, cellprob = flows[:2], flows[2]
    shape = cellprob.shape
    fg = cellprob > params.cellprob_threshold
    if not fg.any():
        return np.zeros(shape, np.uint32)
    dev = torch.device(device)
    step = torch.from_numpy(dP * fg / 5.0).to(dev)
    starts = torch.from_numpy(np.stack(np.nonzero(fg), axis=1)).to(dev)
    pos, escaped = follow_flows_exact(step, starts, params.n_iter(), origin, field)
    ok = ~escaped  # an escaped path is unknown: out of the histogram, label 0
    ids = torch.zeros(len(pos), dtype=torch.int64, device=dev)
    ids[ok] = seed_labels(pos[ok], shape)
    labels = np.zeros(shape, np.int64)
    labels[fg] = ids.cpu().numpy()
    labels = renumber(labels)
    if labels.max() > 0 and params.flow_threshold and params.flow_threshold > 0:
        labels = remove_bad_flow_masks(labels, dP, params.flow_threshold, device)
    return fill_and_remove_small(labels, params.min_size).astype(np.uint32)


def large_ids(area: np.ndarray, field_area: int, fraction: float) -> np.ndarray:
    """Ids (1-based) of the objects larger than ``fraction`` of the field (cellpose's ``max_size_fraction``)."""
    return np.nonzero(np.asarray(area) > field_area * fraction)[0] + 1


def exact_masks(flows: np.ndarray, params: Any, device: str | torch.device = "cpu") -> np.ndarray:
    """Untiled ``cellpose.exact`` labels of one (3, Y, X) flow field: :func:`exact_block_masks` on the whole
    field, then masks over ``max_size_fraction`` of its area removed."""
    labels = exact_block_masks(flows, params, device=device)
    big = large_ids(np.bincount(labels.ravel())[1:], labels.size, params.max_size_fraction)
    if len(big):
        lut = np.arange(int(labels.max()) + 1)
        lut[big] = 0
        labels = renumber(lut[labels]).astype(np.uint32)
    return labels
