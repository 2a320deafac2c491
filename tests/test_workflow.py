"""End-to-end runs of the real Snakefile (subprocess snakemake, 2 cores)."""
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import zarr

from conftest import run_workflow
from pipeline_lib.embed.oracle import write_oracle_predictions
from pipeline_lib.io.synthetic import write_synthetic_plate
from pipeline_lib.measure.metrics import mean_segmentation_accuracy as msa


def _labels(plate, path, name):
    return np.asarray(zarr.open_array(f"{plate}/{path}/labels/{name}/s0", mode="r"))


def _gt(plate, path):
    return np.asarray(zarr.open_array(f"{plate}/{path}/labels/nuclei_gt/s0", mode="r")).reshape(520, 696)


@pytest.fixture(scope="module")
def oracle_plate(real_plate, tmp_path_factory):
    """A writable copy of the real plate and oracle predictions computed from its nuclei_gt labels."""
    tmp = tmp_path_factory.mktemp("oracle")
    plate = tmp / "plate.ome.zarr"
    shutil.copytree(real_plate, plate)
    n = write_oracle_predictions(str(plate), "nuclei_gt", str(tmp / "oracle_predictions.ome.zarr"))
    assert n == 28
    return plate, tmp / "oracle_predictions.ome.zarr"


@pytest.mark.slow  # end-to-end through Snakemake
def test_real_plate_tiny_model(real_plate, tiny_model, tmp_path):
    plate = tmp_path / "plate.ome.zarr"
    shutil.copytree(real_plate, plate)
    before = np.asarray(zarr.open_array(f"{plate}/A/12/0/s0", mode="r"))
    cfg = {"input": str(plate), "output": str(tmp_path / "out"), "tiling": {"tile": 1024, "halo": 64},
           "model": {"checkpoint": tiny_model["checkpoint"], "decoder": tiny_model["decoder"], "device": "cpu"},
           "batching": {"fields_per_job": 14}, "method": "ais", "ais": {"keep_unseeded": True}}
    run_workflow(cfg, tmp_path)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_fields"] == 28 and len(summary["fields"]) == 28
    assert all(f["status"] in ("ok", "empty") for f in summary["fields"])
    for f in summary["fields"]:
        g = zarr.open_group(f["labels"], mode="r")
        assert sorted(g.array_keys()) == ["s0", "s1", "s2"]  # as many levels as the image
        assert g["s0"].shape == (520, 696) and g["s0"].dtype == np.uint32
        assert "image-label" in g.attrs
        maps = zarr.open_array(f"{f['predictions']}/0", mode="r")
        assert maps.shape == (3, 520, 696) and maps.dtype == np.float16
    objects = pd.read_parquet(tmp_path / "out" / "objects.parquet")
    assert len(objects) == summary["n_objects"]
    assert list(objects.columns)[:6] == ["plate", "well", "row", "column", "field", "label"]
    assert np.array_equal(before, np.asarray(zarr.open_array(f"{plate}/A/12/0/s0", mode="r")))  # image untouched
    # the predictions of this run can be re-used without the model
    cfg2 = dict(cfg, output=str(tmp_path / "out2"), predictions=str(tmp_path / "out" / "predictions.ome.zarr"),
                labels={"name": "sam_again"}, model={"name": "vit_b_lm"})
    run_workflow(cfg2, tmp_path / "rerun")
    for f in summary["fields"][:5]:
        assert np.array_equal(_labels(plate, f["path"], "sam"), _labels(plate, f["path"], "sam_again"))


@pytest.mark.slow  # end-to-end through Snakemake
def test_real_plate_from_oracle_predictions(oracle_plate, tmp_path):
    plate, preds = oracle_plate
    base = {"input": str(plate), "predictions": str(preds), "model": {"name": "vit_b_lm"},
            "ais": {"center_distance_threshold": 0.5, "boundary_distance_threshold": 0.5}}
    for name, tile, halo, work in (("untiled", 1024, 64, "a"), ("tiled", 128, 32, "b")):
        run_workflow(dict(base, output=str(tmp_path / name), tiling={"tile": tile, "halo": halo},
                          ais=dict(base["ais"], block=None),  # AIS in the network's tiles
                          labels={"name": name}), tmp_path / work)
    summary = json.loads((tmp_path / "untiled" / "summary.json").read_text())
    assert summary["model"]["skipped"] is True
    scores = []
    for f in summary["fields"]:
        untiled = _labels(plate, f["path"], "untiled")
        tiled = _labels(plate, f["path"], "tiled")
        assert np.array_equal(tiled, untiled), f["path"]  # blockwise AIS is exact, ids included
        scores.append(msa(untiled, _gt(plate, f["path"])))
    assert len(scores) == 28
    assert np.mean(scores) >= 0.920, np.mean(scores)  # micro-sam's own AIS on these maps: 0.920


@pytest.mark.slow  # end-to-end through Snakemake
def test_ngff_05_plate_with_separate_label_store(tiny_model, tmp_path):
    plate = tmp_path / "v05.ome.zarr"
    write_synthetic_plate(plate, rows="B", columns=[2, 3], fields=2, shape=(200, 260), nuclei=20, channels=2,
                          version="0.5")
    write_oracle_predictions(str(plate), "nuclei_gt", str(tmp_path / "pred.ome.zarr"))
    store = tmp_path / "labels_only.ome.zarr"
    cfg = {"input": str(plate), "output": str(tmp_path / "out"), "predictions": str(tmp_path / "pred.ome.zarr"),
           "channel": "DAPI", "labels": {"name": "nuclei", "store": str(store)}, "tiling": {"tile": 128, "halo": 32}}
    run_workflow(cfg, tmp_path)
    assert not (plate / "B/2/0/labels/nuclei").exists()  # input left alone
    g = zarr.open_group(str(store / "B/2/0/labels/nuclei"), mode="r")
    assert g.metadata.zarr_format == 3 and "ome" in g.attrs
    lab = np.asarray(g["s0"])
    gt = np.asarray(zarr.open_array(str(plate / "B/2/0/labels/nuclei_gt/s0"), mode="r"))
    assert msa(lab, gt) > 0.8
    assert zarr.open_group(str(store), mode="r").attrs["ome"]["plate"]["wells"]


@pytest.mark.slow  # end-to-end through Snakemake
def test_bad_inputs_fail_before_tile_work(tiny_model, tmp_path):
    plate = tmp_path / "p.ome.zarr"
    write_synthetic_plate(plate, rows="A", columns=[1], fields=1, shape=(64, 64), nuclei=3)
    cfg = {"input": str(plate), "output": str(tmp_path / "o1"), "model": {"name": "vit_zz"}}
    proc = run_workflow(cfg, tmp_path / "a", check=False)
    assert proc.returncode != 0 and "Valid names" in proc.stdout + proc.stderr
    cfg = {"input": str(plate), "output": str(tmp_path / "o2"), "channel": "GFP",
           "model": {"checkpoint": tiny_model["checkpoint"], "decoder": tiny_model["decoder"]}}
    proc = run_workflow(cfg, tmp_path / "b", check=False)
    assert proc.returncode != 0 and "no channel named 'GFP'" in proc.stdout + proc.stderr
    cfg = {"input": str(plate), "output": str(tmp_path / "o3"), "model": {"checkpoint": tiny_model["checkpoint"]}}
    proc = run_workflow(cfg, tmp_path / "c", check=False)
    assert proc.returncode != 0 and "needs an instance-segmentation decoder" in proc.stdout + proc.stderr
    cfg = {"input": str(plate), "output": str(tmp_path / "o4"), "tiling": {"tile": 5}}
    proc = run_workflow(cfg, tmp_path / "d", check=False)
    assert proc.returncode != 0 and "tiling.tile" in proc.stdout + proc.stderr
    assert not (plate / "A/1/0/labels/sam").exists()


@pytest.mark.slow  # end-to-end through Snakemake
def test_single_image_input(tmp_path, tiny_model):
    """A single OME-Zarr image (c, y, x), predicted with the tiny model in field normalisation mode."""
    from pipeline_lib.io.synthetic import _write_multiscale, blob_field
    img, lab = blob_field((150, 190), 12, seed=9)
    root = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w", zarr_format=2)
    _write_multiscale(root, np.stack([lab.astype(np.uint16), img]), ["c", "y", "x"], 2, "0.4", "image")
    cfg = {"input": str(tmp_path / "img.ome.zarr"), "output": str(tmp_path / "out"), "channel": "ch1",
           "model": {"checkpoint": tiny_model["checkpoint"], "decoder": tiny_model["decoder"], "device": "cpu"},
           "encoder": {"normalization": "field", "batch_size": 2}, "tiling": {"tile": 128, "halo": 16}}
    run_workflow(cfg, tmp_path)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["kind"] == "image" and summary["fields"][0]["status"] in ("ok", "empty")
    g = zarr.open_group(str(tmp_path / "img.ome.zarr/labels/sam"), mode="r")
    assert g["s0"].shape == (150, 190) and g["s1"].shape == (75, 95)
    assert zarr.open_group(str(tmp_path / "img.ome.zarr/labels"), mode="r").attrs["labels"] == ["sam"]
    maps = zarr.open_array(str(tmp_path / "out/predictions.ome.zarr/0"), mode="r")
    assert maps.shape == (3, 150, 190) and float(np.asarray(maps).max()) > 0


@pytest.mark.slow  # end-to-end through Snakemake
def test_corrupt_chunk_fails_that_field_only_and_a_rerun_redoes_just_its_batch(tiny_model, tmp_path):
    plate = tmp_path / "p.ome.zarr"
    write_synthetic_plate(plate, rows="A", columns=[1, 2], fields=1, shape=(120, 150), nuclei=8)
    chunk = plate / "A/2/0/s0/0/0/0"
    assert chunk.is_file()
    good = chunk.read_bytes()
    chunk.write_bytes(b"not a blosc chunk")
    cfg = {"input": str(plate), "output": str(tmp_path / "out"), "tiling": {"tile": 256, "halo": 16},
           "model": {"checkpoint": tiny_model["checkpoint"], "decoder": tiny_model["decoder"], "device": "cpu"},
           "method": "ais", "batching": {"fields_per_job": 1}}
    first = run_workflow(cfg, tmp_path, check=False)
    assert first.returncode != 0  # the run says that fields failed, and which
    assert "1 of 2 fields failed" in first.stderr and "A/2/0: failed" in first.stderr
    fields = {f["path"]: f for f in json.loads((tmp_path / "out" / "summary.json").read_text())["fields"]}
    assert fields["A/2/0"]["status"] == "failed"
    assert "A/2/0" in fields["A/2/0"]["error"] and "corrupt" in fields["A/2/0"]["error"]
    assert fields["A/1/0"]["status"] in ("ok", "empty")
    assert (plate / "A/1/0/labels/sam/s0").exists()
    assert "A/2/0" in (tmp_path / "out" / "report.html").read_text()
    # the failed batch (b0001) was retired: a rerun plans exactly its jobs, then the aggregate and report
    jobs = tmp_path / "out" / "jobs"
    assert (jobs / "segment" / "b0001.json.failed").exists() and not (jobs / "segment" / "b0001.json").exists()
    dry = run_workflow(cfg, tmp_path, extra=("--dry-run",))
    stats = dict(re.findall(r"^(\w+)\s+(\d+)$", dry.stdout + dry.stderr, flags=re.M))
    assert {k: stats.get(k) for k in ("predict", "segment", "measure", "aggregate", "total")} == {
        "predict": "1", "segment": "1", "measure": "1", "aggregate": "1", "total": "7"}
    kept = (jobs / "measure" / "b0000.json").stat().st_mtime_ns
    chunk.write_bytes(good)  # the input is repaired
    run_workflow(cfg, tmp_path)
    fields = {f["path"]: f for f in json.loads((tmp_path / "out" / "summary.json").read_text())["fields"]}
    assert fields["A/2/0"]["status"] in ("ok", "empty") and (jobs / "measure" / "b0001.json").exists()
    assert (jobs / "measure" / "b0000.json").stat().st_mtime_ns == kept  # the good batch was not redone


def test_large_field_scratch_on_disk_gives_same_labels(tmp_path, monkeypatch):
    """Above the in-memory limit the AIS scratch goes to a zarr under output/tmp (removed afterwards)."""
    from pipeline_lib.config import validate_config
    from pipeline_lib.steps import segment
    from pipeline_lib.steps.plan import make_plan
    plate = tmp_path / "p.ome.zarr"
    write_synthetic_plate(plate, rows="A", columns=[1], fields=1, shape=(200, 260), nuclei=20)
    write_oracle_predictions(str(plate), "nuclei_gt", str(tmp_path / "pred.ome.zarr"))
    results = []
    for limit, name in ((10**12, "mem"), (0, "disk")):
        cfg = validate_config({"input": str(plate), "output": str(tmp_path / name), "labels": {"name": name},
                               "predictions": str(tmp_path / "pred.ome.zarr"), "tiling": {"tile": 64, "halo": 16},
                               "ais": {"block": 64}})
        monkeypatch.setattr(segment, "_SCRATCH_IN_MEMORY", limit)
        plan = make_plan(cfg)
        info, table = segment.segment_field(cfg, plan, plan["fields"][0])
        results.append((info["n_objects"], _labels(plate, "A/1/0", name), table))
    assert results[0][0] == results[1][0] > 5
    assert np.array_equal(results[0][1], results[1][1])
    assert results[0][2]["area"].tolist() == results[1][2]["area"].tolist()
    assert (tmp_path / "disk" / "tmp").is_dir() and not list((tmp_path / "disk" / "tmp").iterdir())
