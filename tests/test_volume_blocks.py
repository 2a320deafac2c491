"""Volumes in jobs of block groups (issue 12): labels independent of the grouping, per-object intensities,
the AnnData table and the report, and the failure protocol (a failed block is named, retired and redone
alone on rerun, giving the labels of an uninterrupted run)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from scipy import ndimage

from conftest import run_workflow
from pipeline_lib.io.synthetic_volume import write_synthetic_volume
from pipeline_lib.steps.volume_plan import edge_inputs
from pipeline_lib.testing.volume import run_volume_steps

SHAPE = (16, 96, 96)  # 2 slabs x 4 tiles of 48 (halo 16): 8 blocks
BAD_CHUNK = ("0", "15", "0", "0")  # predictions chunk (c, z, y, x) of 24 x 24: read only by block s00001_t00000


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    d = tmp_path_factory.mktemp("volblocks")
    write_synthetic_volume(d / "vol.ome.zarr", shape=SHAPE, predictions=str(d / "pred.ome.zarr"),
                           block=SHAPE, chunk=24)
    return d


def _copy(src: Path, dst: Path) -> Path:
    for name in ("vol.ome.zarr", "pred.ome.zarr"):
        shutil.copytree(src / name, dst / name)
    return dst


def _cfg(d: Path, name: str, blocks_per_job: int) -> dict:
    return {"input": str(d / "vol.ome.zarr"), "output": str(d / f"out_{name}"), "predictions": str(d / "pred.ome.zarr"),
            "tiling": {"tile": 48, "halo": 16}, "volume": {"z_block": 8, "blocks_per_job": blocks_per_job},
            "labels": {"name": name}}


def _labels(d: Path, name: str, level: str = "s0") -> np.ndarray:
    return np.asarray(zarr.open_array(str(d / "vol.ome.zarr" / "labels" / name / level), mode="r"))


def test_block_groups_give_the_labels_of_whole_slabs(volume, tmp_path):
    """Jobs of 3 blocks (crossing the slab boundary) = one job of everything: labels at every level, objects;
    level k's label chunks are tile / 2^k, so a block owns whole chunks of every level."""
    d = _copy(volume, tmp_path)
    small = run_volume_steps(_cfg(d, "g3", 3))
    one = run_volume_steps(_cfg(d, "g1k", 1024))
    plan = json.loads((d / "out_g3" / "plan.json").read_text())
    assert plan["batches"] == {"b00000": [0, 3], "b00001": [3, 6], "b00002": [6, 8]}
    # edge jobs wait only for the pass-1 jobs whose blocks they read (neighbour tiles, slices below)
    assert edge_inputs(plan, "b00000", 3) == ["b00000", "b00001", "b00002"]
    assert edge_inputs(plan, "b00002", 3) == ["b00002"]
    assert small["grid"]["n_blocks"] == 8 and small["n_objects"] == one["n_objects"] > 20
    for lvl in ("s0", "s1"):
        assert np.array_equal(_labels(d, "g3", lvl), _labels(d, "g1k", lvl))
    assert zarr.open_array(str(d / "vol.ome.zarr/labels/g3/s1"), mode="r").chunks[-2:] == (24, 24)
    a, b = (pd.read_parquet(d / f"out_{n}" / "objects.parquet") for n in ("g3", "g1k"))
    pd.testing.assert_frame_equal(a, b)


def test_intensity_features_table_and_report(volume, tmp_path):
    """Blockwise intensities equal scipy.ndimage on the whole volume; the AnnData table opens in ngio and
    the label image validates; report.html shows slices and histograms."""
    import ngio
    from ome_zarr_models.v04 import image_label
    from pipeline_lib.report.volume import run_volume_report
    from pipeline_lib.config import validate_config
    d = _copy(volume, tmp_path)
    cfg = _cfg(d, "sam", 3)
    s = run_volume_steps(cfg)
    lab = _labels(d, "sam")
    img = np.asarray(zarr.open_array(str(d / "vol.ome.zarr" / "s0"), mode="r"))[0].astype(np.float64)
    obj = pd.read_parquet(d / "out_sam" / "objects.parquet")
    ids = obj["label"].to_numpy()
    (ch,) = s["channels"]
    for col, fn in (("mean", ndimage.mean), ("min", ndimage.minimum), ("max", ndimage.maximum),
                    ("sum", ndimage.sum)):
        assert np.allclose(obj[f"intensity_{col}_{ch}"], fn(img, lab, ids)), col
    container = ngio.open_ome_zarr_container(str(d / "vol.ome.zarr"))
    table = container.get_table("sam").dataframe
    assert len(table) == len(obj) and f"intensity_mean_{ch}" in table.columns
    assert "sam" in container.list_labels()
    image_label.ImageLabel.from_zarr(zarr.open_group(str(d / "vol.ome.zarr/labels/sam"), mode="r"))
    html = Path(run_volume_report(validate_config(cfg), str(d / "out_sam"), str(d / "out_sam/summary.json"),
                                  str(d / "out_sam/objects.parquet"))).read_text()
    assert html.count("<img") == 2 + 6 and "Failed blocks</h2><p class=\"ok\">none" in html


def test_failed_block_is_named_retired_and_the_run_fails(volume, tmp_path):
    """In process: the corrupt chunk fails one block; summary and report name it, the completion check
    retires its batch's pass-1 marker and fails naming the block."""
    from pipeline_lib.config import validate_config
    from pipeline_lib.report.volume import run_volume_report
    from pipeline_lib.steps.volume_relabel import FailedBlocksError, check_volume_complete
    d = _copy(volume, tmp_path)
    (d / "pred.ome.zarr" / "0" / Path(*BAD_CHUNK)).write_bytes(b"not a chunk")
    cfg = validate_config(_cfg(d, "bad", 2))
    s = run_volume_steps(cfg)
    assert list(s["failed_blocks"]) == ["s00001_t00000"] and s["failed_batches"] == ["b00002"]
    out = d / "out_bad"
    html = Path(run_volume_report(cfg, str(out), str(out / "summary.json"), str(out / "objects.parquet"))).read_text()
    assert "Failed blocks (1)" in html and "s00001_t00000" in html and "8..15" in html
    with pytest.raises(FailedBlocksError, match="(?s)block s00001_t00000: .*pred.ome.zarr.*b00002"):
        check_volume_complete(cfg, str(out), str(out / "jobs" / "complete.json"))
    assert (out / "jobs/volume_segment/b00002.json.failed").exists()
    assert not (out / "jobs/volume_segment/b00002.json").exists() and (out / "jobs/volume_segment/b00001.json").exists()
    assert not (out / "jobs" / "complete.json").exists()


@pytest.mark.slow  # two Snakemake runs
def test_rerun_after_repair_redoes_only_the_failed_block(volume, tmp_path):
    """Through Snakemake: the run with a corrupt chunk writes everything and fails naming the block; after
    the chunk is repaired, the rerun redoes only that block's batch in pass 1 and the edge jobs reading it
    (plus merge and relabel), and the labels equal those of an uninterrupted run."""
    ref = _copy(volume, tmp_path / "ref")
    run_volume_steps(_cfg(ref, "sam", 2))
    d = _copy(volume, tmp_path / "run")
    chunk = d / "pred.ome.zarr" / "0" / Path(*BAD_CHUNK)
    good = chunk.read_bytes()
    chunk.write_bytes(b"not a chunk")
    cfg = _cfg(d, "sam", 2)
    first = run_workflow(cfg, d / "wd", check=False)
    out = d / "out_sam"
    assert first.returncode != 0 and "block s00001_t00000" in first.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["failed_blocks"]) == ["s00001_t00000"]
    assert "s00001_t00000" in (out / "report.html").read_text() and (out / "objects.parquet").exists()
    jobs = out / "jobs"
    kept = [jobs / "volume_segment" / f"b0000{i}.json" for i in (0, 1, 3)] + \
           [jobs / "volume_edges" / f"b0000{i}.npz" for i in (1, 3)]  # edges b1, b3 read no block of b2
    mtimes = {p: p.stat().st_mtime_ns for p in kept}
    chunk.write_bytes(good)  # the data is repaired
    run_workflow(cfg, d / "wd")
    assert {p: p.stat().st_mtime_ns for p in kept} == mtimes
    assert json.loads((jobs / "complete.json").read_text())["failed"] == []
    for lvl in ("s0", "s1"):
        assert np.array_equal(_labels(d, "sam", lvl), _labels(ref, "sam", lvl))
    pd.testing.assert_frame_equal(pd.read_parquet(out / "objects.parquet"),
                                  pd.read_parquet(ref / "out_sam" / "objects.parquet"))
