"""2D of any size: the blockwise engine (blocks with a halo, stitched by halo-overlap agreement) and APG/AMG
of large fields through it, against the whole-image result."""
import numpy as np
import pytest
import zarr
from skimage.measure import regionprops_table

from pipeline_lib.embed.oracle import oracle_maps
from pipeline_lib.instances.apg import apg_segment
from pipeline_lib.io.synthetic import blob_field
from pipeline_lib.measure.metrics import mean_segmentation_accuracy as msa
from pipeline_lib.stitch.blockwise import block_grid_2d, segment_blockwise
from pipeline_lib.tiling import block_grid
from test_apg import _oracle_decode


def _relabel(crop):
    from skimage.segmentation import relabel_sequential
    return relabel_sequential(crop)[0]


def test_blockwise_recovers_objects_across_seams_exactly():
    """Every block sees the true labels of its outer region: stitched labels are the ground truth (the same
    partition), also for objects across seams and corners; area and centroid as regionprops."""
    _, gt = blob_field((410, 377), n=160, seed=3)
    out = np.zeros(gt.shape, np.uint32)
    seen = []
    res = segment_blockwise(gt.shape, out, lambda b: _relabel(gt[b.outer]), block=96, halo=40,
                            progress=lambda name, i: seen.append(name))
    assert res["n_blocks"] == 20 and seen.count("segment") == seen.count("relabel") == 20 and res["n_joins"] > 20
    assert msa(out, gt) == 1.0 and res["n_objects"] == len(np.unique(gt)) - 1
    assert np.array_equal(np.unique(out), np.arange(res["n_objects"] + 1))
    props = regionprops_table(out.astype(np.int64), properties=("label", "area", "centroid"))
    assert np.array_equal(res["label"], props["label"]) and np.array_equal(res["area"], props["area"])
    np.testing.assert_allclose(res["centroid"], [props["centroid-0"], props["centroid-1"]])


def test_blockwise_holds_about_one_row_of_strips():
    """Memory: halo strips are dropped once a block's neighbours are done (about one row of blocks held)."""
    import pipeline_lib.stitch.blockwise as bw
    _, gt = blob_field((300, 600), n=80, seed=1)
    peak = []
    original = bw._Seams.add

    def add(self, t, ring, n):
        original(self, t, ring, n)
        peak.append(len({k for k, _ in self.strips}))
    bw._Seams.add = add
    try:
        segment_blockwise(gt.shape, np.zeros(gt.shape, np.uint32), lambda b: _relabel(gt[b.outer]), 50, 20)
    finally:
        bw._Seams.add = original
    grid = block_grid_2d(gt.shape, 50, 20)
    row = 600 // 50
    assert grid.n_tiles == 72 and max(peak) <= row + 2 < grid.n_tiles


@pytest.mark.parametrize("seed", [0, 1])
def test_blockwise_apg_equals_untiled(seed):
    """APG per block (oracle maps, a decoder whose masks depend only on local content) vs APG on the whole
    image: mSA >= 0.99 (issue 12)."""
    _, gt = blob_field((520, 480), n=150, seed=seed)
    maps = oracle_maps(gt)
    whole = block_grid(gt.shape, max(gt.shape))
    untiled, _ = apg_segment(maps, max(gt.shape), _oracle_decode(gt, whole))

    def block_labels(b):
        crop = gt[b.outer]
        tiles = block_grid(crop.shape, 64, 16)
        return apg_segment(maps[(slice(None),) + b.outer], 64, _oracle_decode(crop, tiles))[0]
    out = np.zeros(gt.shape, np.uint32)
    segment_blockwise(gt.shape, out, block_labels, block=160, halo=48)
    assert msa(out, untiled) >= 0.99 and msa(untiled, gt) >= 0.95


def _one_field_setup(tmp_path, tiny_model, **tiling):
    from pipeline_lib.config import validate_config
    from pipeline_lib.io.synthetic import write_synthetic_plate
    from pipeline_lib.steps.model import resolve_model
    from pipeline_lib.steps.plan import write_plan
    plate = tmp_path / "p.ome.zarr"
    write_synthetic_plate(plate, rows="A", columns=[1], fields=1, shape=(64, 32), nuclei=3, seed=2)
    cfg = validate_config({"input": str(plate), "output": str(tmp_path / "out"), "method": "apg",
                           "tiling": {"tile": 32, "halo": 4, "field_halo": 32}, "encoder": {"batch_size": 4},
                           "model": {"checkpoint": tiny_model["checkpoint"], "decoder": tiny_model["decoder"],
                                     "device": "cpu"}})
    cfg["tiling"].update(tiling)  # blocks below the schema's minimum size: 2 blocks of a 2-tile field
    return cfg, write_plan(cfg, str(tmp_path / "out" / "plan.json")), resolve_model(cfg, progress=False)


def test_large_field_step_writes_labels_maps_and_table(tmp_path, tiny_model):
    """APG in the prompt_segment step for a field larger than tiling.field_block: the block-inner decoder
    maps equal the in-memory path's (blocks and block halo are multiples of the tile, so every tile sees the
    same pixels), labels are consecutive and the status counts what was written."""
    from pipeline_lib.steps.prompt_segment import run_prompt_segment_batch

    def run(name, **tiling):
        cfg, plan, info = _one_field_setup(tmp_path / name, tiny_model, **tiling)
        res = run_prompt_segment_batch(cfg, plan, "b0000", info, str(tmp_path / f"{name}.json"))
        f = plan["fields"][0]
        return (res["fields"][f["key"]], np.asarray(zarr.open_array(f"{f['predictions']}/0", mode="r")),
                np.asarray(zarr.open_array(f"{f['labels']}/s0", mode="r")))
    _, ref_maps, _ = run("small")
    st, maps, labels = run("large", field_block=32)
    assert st["status"] in ("ok", "empty") and st["n_blocks"] == 2
    assert np.array_equal(maps, ref_maps) and float(np.abs(maps).max()) > 0
    assert np.array_equal(np.unique(labels), np.arange(st["n_objects"] + 1))
