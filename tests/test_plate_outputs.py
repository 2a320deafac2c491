"""Whole-plate results through the real Snakefile: every output file, metrics against an independent mSA,
feature tables next to the images, per-well sums, and multi-channel intensities with failures."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import zarr

from conftest import independent_scores, run_workflow
from pipeline_lib.embed.oracle import write_oracle_predictions
from pipeline_lib.io.synthetic import write_synthetic_plate
from pipeline_lib.io.tables import read_feature_table

PLATE_FILES = ["summary.json", "objects.parquet", "fields.csv", "wells.csv", "plate.csv", "metrics.csv",
               "provenance.json", "report.html"]


@pytest.fixture(scope="module")
def plate_run(real_plate, tmp_path_factory):
    """The real plate (28 fields) segmented from oracle predictions, scored against nuclei_gt."""
    tmp = tmp_path_factory.mktemp("plate_outputs")
    plate = tmp / "plate.ome.zarr"
    shutil.copytree(real_plate, plate)
    write_oracle_predictions(str(plate), "nuclei_gt", str(tmp / "oracle.ome.zarr"))
    out = tmp / "out"
    cfg = {"input": str(plate), "output": str(out), "predictions": str(tmp / "oracle.ome.zarr"),
           "ground_truth": "nuclei_gt", "batching": {"fields_per_job": 8}}
    run_workflow(cfg, tmp)
    return plate, out


@pytest.mark.slow  # end-to-end through Snakemake
def test_real_plate_writes_every_output(plate_run):
    plate, out = plate_run
    for name in PLATE_FILES:
        assert (out / name).stat().st_size > 0, name
    assert sorted(p.name for p in (out / "report").glob("heatmap_*.png"))
    summary = json.loads((out / "summary.json").read_text())
    fields, wells = pd.read_csv(out / "fields.csv"), pd.read_csv(out / "wells.csv")
    plate_row = pd.read_csv(out / "plate.csv").iloc[0]
    objects = pd.read_parquet(out / "objects.parquet")
    assert len(fields) == 28 and len(wells) == 22 and set(fields["status"]) == {"ok"}
    assert len(objects) == summary["n_objects"] == fields["n_objects"].sum() == plate_row["n_objects"]
    per_well = fields.groupby("well")["n_objects"].sum()
    assert np.array_equal(wells["n_objects"], per_well.reindex(wells["well"]).to_numpy())
    medians = objects.groupby("well")["area"].median()
    assert np.allclose(wells.set_index("well")["median_area_px"], medians.reindex(wells["well"]).to_numpy())
    assert {"eccentricity", "solidity", "major_axis_length", "bbox_max_x", "intensity_mean_c0",
            "intensity_min_c0", "intensity_max_c0"} <= set(objects.columns)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["method"] == "ais" and prov["params"]["resolved"]["center_distance_threshold"] is not None
    assert {"zarr", "numpy", "snakemake", "pipeline_lib"} <= set(prov["versions"])
    # the AnnData table next to each image holds exactly that field's rows of objects.parquet
    for f in summary["fields"][::9]:
        table = read_feature_table(f"{plate}/{f['path']}", "sam")
        mine = objects[(objects["well"] == f["well"]) & (objects["field"].astype(str) == f["field"])]
        assert np.array_equal(table["label"], mine["label"])
        assert np.allclose(table["solidity"], mine["solidity"], rtol=1e-6)


@pytest.mark.slow  # end-to-end through Snakemake
def test_metrics_csv_agrees_with_an_independent_msa(plate_run):
    plate, out = plate_run
    metrics = pd.read_csv(out / "metrics.csv", dtype={"field": str, "well": str})
    per_field = metrics[metrics["level"] == "field"].set_index(["well", "field"])
    summary = json.loads((out / "summary.json").read_text())
    ref = {}
    for f in summary["fields"]:
        pred = zarr.open_array(f"{plate}/{f['path']}/labels/sam/s0", mode="r")[:]
        true = zarr.open_array(f"{plate}/{f['path']}/labels/nuclei_gt/s0", mode="r")[:]
        ref[(f["well"], f["field"])] = independent_scores(pred, true)
        for k in ("msa", "sa50", "error_rate"):
            assert per_field.loc[(f["well"], f["field"]), k] == pytest.approx(ref[(f["well"], f["field"])][k], abs=1e-12)
    plate_msa = metrics.loc[metrics["level"] == "plate", "msa"].item()
    assert plate_msa == pytest.approx(np.mean([r["msa"] for r in ref.values()]), abs=1e-12)
    assert plate_msa >= 0.92  # oracle maps: the AIS quality measured in the foundation issue
    well = metrics[(metrics["level"] == "well")].set_index("well")["msa"]
    for w, m in well.items():
        assert m == pytest.approx(np.mean([r["msa"] for (ww, _), r in ref.items() if ww == w]), abs=1e-12)


@pytest.mark.slow  # end-to-end through Snakemake
def test_synthetic_multichannel_plate_with_a_failed_and_an_unscored_field(tmp_path):
    """Intensities in every channel; a corrupt chunk in channel 1 fails just that field, named in the
    outputs; a field without ground truth is listed as unscored."""
    plate = tmp_path / "plate.ome.zarr"
    write_synthetic_plate(plate, rows="AB", columns=(1, 2), fields=2, shape=(128, 160), channels=2, seed=4)
    write_oracle_predictions(str(plate), "nuclei_gt", str(tmp_path / "oracle.ome.zarr"), chunk=64)
    level0 = plate / "B" / "2" / "1" / "s0"
    chunk = sorted(p for p in level0.rglob("*") if p.is_file() and p.relative_to(level0).parts[0] == "1")[0]
    chunk.write_bytes(b"not a chunk")  # channel 1 of field B/2/1
    shutil.rmtree(plate / "A" / "1" / "1" / "labels" / "nuclei_gt")
    out = tmp_path / "out"
    run = run_workflow({"input": str(plate), "output": str(out), "predictions": str(tmp_path / "oracle.ome.zarr"),
                        "ground_truth": "nuclei_gt", "tiling": {"tile": 64, "halo": 16}}, tmp_path, check=False)
    assert run.returncode != 0 and "B/2/1: failed" in run.stderr  # outputs written, then the run fails
    objects = pd.read_parquet(out / "objects.parquet")
    fields = pd.read_csv(out / "fields.csv", dtype={"field": str})
    assert {"intensity_mean_DAPI", "intensity_mean_ch1", "intensity_max_ch1"} <= set(objects.columns)  # OMERO names
    failed = fields[fields["status"] == "failed"]
    assert list(failed["path"]) == ["B/2/1"] and "B/2/1" in failed["error"].item()
    assert objects["intensity_mean_ch1"].notna().all()
    assert set(objects.loc[objects["well"] == "B2", "field"].astype(str)) == {"0"}  # no rows of the failed field
    unscored = fields[(fields["status"] == "ok") & fields["msa"].isna()]
    assert list(unscored["path"]) == ["A/1/1"]
    wells = pd.read_csv(out / "wells.csv").set_index("well")
    assert "1 failed field" in wells.loc["B2", "qc"]
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics.loc[metrics["level"] == "plate", "n_fields"].item() == 6  # 8 fields - failed - unscored
    assert "B/2/1" in (out / "report.html").read_text()


@pytest.mark.slow  # end-to-end through Snakemake
def test_tiff_export_then_ingest_gives_the_same_objects(real_plate, tiny_model, tmp_path):
    """The real plate exported to ImageXpress-style TIFFs, ingested and segmented (tiny SAM on the pixels)
    gives the same objects, features and intensities as the OME-Zarr input."""
    from conftest import subset_plate
    from pipeline_lib.io.ingest import export_tiffs
    wells = ["A/16", "B/21"]
    zarr_plate = subset_plate(real_plate, tmp_path / "plate.ome.zarr", wells)
    tiffs = tmp_path / "tiffs"
    files = export_tiffs(str(real_plate), str(tiffs), wells=wells)
    assert {p.name for p in files} >= {"A16_s1_w1.tif", "B21_s1_w1.tif"}
    model = {"checkpoint": tiny_model["checkpoint"], "decoder": tiny_model["decoder"], "device": "cpu"}
    base = {"method": "ais", "ais": {"keep_unseeded": True}, "model": model, "tiling": {"tile": 1024, "halo": 64}}
    run_workflow(dict(base, input=str(zarr_plate), output=str(tmp_path / "out_zarr")), tmp_path / "a")
    run_workflow(dict(base, input=str(tmp_path / "ingested.ome.zarr"), output=str(tmp_path / "out_tiff"),
                      ingest={"source": str(tiffs), "pattern": "{well}_s{field}_w{channel}.tif",
                              "channel_names": ["c0"]}), tmp_path / "b")
    keys = ["well", "field", "label"]
    a = pd.read_parquet(tmp_path / "out_zarr" / "objects.parquet").drop(columns="plate").sort_values(keys)
    b = pd.read_parquet(tmp_path / "out_tiff" / "objects.parquet").drop(columns="plate").sort_values(keys)
    assert len(a) > 50
    assert list(b.columns) == list(a.columns)
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_dtype=False)
    fa, fb = (pd.read_csv(tmp_path / d / "fields.csv") for d in ("out_zarr", "out_tiff"))
    assert fa["n_objects"].tolist() == fb["n_objects"].tolist() and (fa["status"] == "ok").all()


@pytest.mark.slow  # end-to-end through Snakemake
def test_real_plate_report_screenshot_shows_heatmaps_and_thumbnails(plate_run, tmp_path):
    from PIL import Image

    from conftest import outline_mask, screenshot, viridis_mask
    _, out = plate_run
    html = (out / "report.html").read_text()
    for section in ("heatmaps", "qc", "thumbnails", "metrics", "provenance"):
        assert f'<section id="{section}">' in html
    screenshot(out / "report.html", tmp_path / "shot.png", height=5000)
    shutil.copy(tmp_path / "shot.png", out / "report_screenshot.png")  # kept for a look at the page
    rgb = np.asarray(Image.open(tmp_path / "shot.png").convert("RGB"))
    assert viridis_mask(rgb).sum() > 20_000 and outline_mask(rgb).sum() > 2_000
