"""Time the per-object measurements and the accuracy scores on one large, crowded field.

A synthetic field of ``--side`` x ``--side`` pixels (tiles of synthetic nuclei, about 300 per 512^2),
``--channels`` intensity channels, and a prediction that is the ground truth shifted by one pixel with
5% of the objects dropped. Prints the time and peak memory of

- ``measure_labels`` (ours: features in every channel, block 2048) against scikit-image's
  ``regionprops_table`` with the same properties on the whole image in memory;
- ``blockwise_scores`` (ours: sparse overlap counts summed over 2048 blocks, exact matching) against
  the same counting on the whole image at once (``segmentation_scores``).

    python bench/measure.py [--side 4096] [--channels 3]
"""
from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def crowded_field(side: int, seed: int = 0) -> np.ndarray:
    """Tiles of synthetic nuclei with unique ids (about 300 objects per 512 x 512 tile)."""
    from pipeline_lib.io.synthetic import blob_field
    out = np.zeros((side, side), np.uint32)
    n = 0
    for i, y in enumerate(range(0, side, 512)):
        for j, x in enumerate(range(0, side, 512)):
            _, lab = blob_field((512, 512), 300, radius=(5, 11), seed=seed + 1000 * i + j)
            h, w = out[y:y + 512, x:x + 512].shape
            lab = lab[:h, :w].astype(np.uint32)
            out[y:y + h, x:x + w] = np.where(lab > 0, lab + n, 0)
            n += int(lab.max())
    return out


def timed(fn, *args, **kw):
    tracemalloc.start()
    t0 = time.perf_counter()
    res = fn(*args, **kw)
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return res, dt, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=4096)
    ap.add_argument("--channels", type=int, default=3)
    args = ap.parse_args()
    from skimage.measure import regionprops_table

    from pipeline_lib.measure.metrics import segmentation_scores
    from pipeline_lib.measure.regionprops import measure_labels
    from pipeline_lib.steps.measure import blockwise_scores

    t0 = time.perf_counter()
    gt = crowded_field(args.side)
    rng = np.random.default_rng(0)
    chans = [rng.integers(0, 4096, gt.shape, dtype=np.uint16) for _ in range(args.channels)]
    ids = np.unique(gt)[1:]
    drop = rng.choice(ids, len(ids) // 20, replace=False)
    pred = np.roll(gt, 1, axis=1)
    pred[np.isin(pred, drop)] = 0
    print(f"field {args.side}x{args.side}, {len(ids)} objects, {args.channels} channels "
          f"(made in {time.perf_counter() - t0:.1f} s)")

    feats, dt, peak = timed(measure_labels, gt, chans, [f"c{i}" for i in range(args.channels)])
    print(f"ours   measure_labels (block 2048):    {dt:6.2f} s  peak {peak:7.0f} MB  ({len(feats)} rows, "
          f"{len(feats.columns)} columns)")
    props = ["label", "area", "centroid", "bbox", "major_axis_length", "minor_axis_length", "eccentricity",
             "orientation", "solidity", "intensity_mean", "intensity_min", "intensity_max"]
    ref, dt, peak = timed(regionprops_table, gt, intensity_image=np.stack(chans, -1), properties=props)
    print(f"skimage regionprops_table (in memory): {dt:6.2f} s  peak {peak:7.0f} MB")
    for k, c in (("area", "area"), ("solidity", "solidity"), ("eccentricity", "eccentricity"),
                 ("orientation", "orientation"), ("major_axis_length", "major_axis_length"),
                 ("intensity_mean-0", "intensity_mean_c0")):
        d = np.abs(np.asarray(ref[k], float) - feats[c].to_numpy())
        if k == "orientation":  # +pi/2 and -pi/2 are the same axis
            d = np.minimum(d, np.abs(d - np.pi))
        print(f"  {c:18s} max |ours - skimage| {d.max():.1e}, objects differing by > 1e-9: {(d > 1e-9).sum()}")

    s, dt, peak = timed(blockwise_scores, pred, gt)
    print(f"ours   blockwise_scores (block 2048):  {dt:6.2f} s  peak {peak:7.0f} MB  "
          f"mSA {s['msa']:.4f} SA50 {s['sa50']:.4f} error rate {s['error_rate']:.4f}")
    r, dt, peak = timed(segmentation_scores, pred, gt)
    print(f"ours   segmentation_scores (one shot): {dt:6.2f} s  peak {peak:7.0f} MB  mSA {r['msa']:.4f}")


if __name__ == "__main__":
    main()
