"""Per-object features, blockwise accuracy scores, feature tables and the per-well/plate summaries."""
import numpy as np
import pandas as pd
import pytest
import zarr
from skimage.measure import regionprops_table

from conftest import independent_scores
from pipeline_lib.io.synthetic import blob_field
from pipeline_lib.io.tables import read_feature_table, write_feature_table
from pipeline_lib.measure.metrics import segmentation_scores
from pipeline_lib.measure.regionprops import measure_labels
from pipeline_lib.measure.summaries import fields_table, metrics_table, plate_table, public, wells_table
from pipeline_lib.steps.measure import blockwise_scores

SKIMAGE = {"area": "area", "centroid-0": "centroid_y", "centroid-1": "centroid_x", "bbox-0": "bbox_min_y",
           "bbox-1": "bbox_min_x", "bbox-2": "bbox_max_y", "bbox-3": "bbox_max_x",
           "major_axis_length": "major_axis_length", "minor_axis_length": "minor_axis_length",
           "eccentricity": "eccentricity", "orientation": "orientation", "solidity": "solidity",
           "intensity_mean-0": "intensity_mean_DAPI", "intensity_min-0": "intensity_min_DAPI",
           "intensity_max-0": "intensity_max_DAPI", "intensity_mean-1": "intensity_mean_GFP_1",
           "intensity_min-1": "intensity_min_GFP_1", "intensity_max-1": "intensity_max_GFP_1"}


@pytest.mark.parametrize("block", [4096, 128, 97])
def test_features_equal_skimage_regionprops(block):
    _, lab = blob_field((300, 420), 120, seed=3)
    lab[lab == 7] = 0  # a gap in the ids
    rng = np.random.default_rng(0)
    chans = [rng.integers(0, 4000, lab.shape).astype(np.uint16), rng.random(lab.shape).astype(np.float32)]
    ref = regionprops_table(lab, intensity_image=np.stack(chans, -1).astype(np.float64),
                            properties=["label", "area", "centroid", "bbox", "major_axis_length", "minor_axis_length",
                                        "eccentricity", "orientation", "solidity", "intensity_mean", "intensity_min",
                                        "intensity_max"])
    out = measure_labels(lab, chans, ["DAPI", "GFP-1"], block=block)
    assert np.array_equal(out["label"].to_numpy(), ref["label"])
    for k, col in SKIMAGE.items():
        np.testing.assert_allclose(out[col].to_numpy(), np.asarray(ref[k], float), rtol=1e-9, atol=1e-9, err_msg=col)


def test_features_of_an_empty_field_have_the_columns():
    out = measure_labels(np.zeros((50, 60), np.uint32), [np.ones((50, 60))], ["c0"])
    assert len(out) == 0 and {"label", "area", "solidity", "intensity_max_c0"} <= set(out.columns)


def test_blockwise_scores_equal_an_independent_matching():
    _, true = blob_field((160, 200), 40, seed=1)
    rng = np.random.default_rng(2)
    pred = np.roll(true, (2, -3), axis=(0, 1)).astype(np.int64)  # shifted: IoUs spread over the thresholds
    pred[(pred % 7) == 3] = 0  # some objects missed
    pred[rng.random(pred.shape) < 0.02] = 0
    pred[100:110, 10:30] = 999  # a false positive
    ref = independent_scores(pred, true)
    assert 0.05 < ref["msa"] < 0.9 and ref["error_rate"] > 0.1  # not a trivial case
    for block in (4096, 37):
        s = blockwise_scores(pred, true, block=block)
        assert {k: s[k] for k in ref} == pytest.approx(ref)
    assert segmentation_scores(pred, true)["msa"] == pytest.approx(ref["msa"])


@pytest.mark.parametrize("fmt", [2, 3])
def test_feature_table_is_fractal_anndata(tmp_path, fmt):
    import anndata as ad
    store = tmp_path / "img.zarr"
    zarr.open_group(store, mode="w", zarr_format=fmt)
    df = pd.DataFrame({"label": np.array([1, 2, 9], np.uint32), "area": [3, 4, 5], "solidity": [1.0, 0.9, 0.8]})
    write_feature_table(str(store), "sam", "sam", df)
    write_feature_table(str(store), "sam", "sam", df.iloc[:2])  # a rerun replaces it
    attrs = zarr.open_group(store / "tables" / "sam").attrs
    assert attrs["type"] == "feature_table" and attrs["instance_key"] == "label"
    assert attrs["region"] == {"path": "../labels/sam"}
    assert zarr.open_group(store / "tables").attrs["tables"] == ["sam"]
    table = ad.read_zarr(store / "tables" / "sam")
    assert list(table.obs_names) == ["1", "2"] and list(table.var_names) == ["area", "solidity"]
    pd.testing.assert_frame_equal(read_feature_table(str(store), "sam"), df.iloc[:2].astype(
        {"label": np.int64, "area": np.float32, "solidity": np.float32}), check_dtype=False)


def _field(well, field):
    return {"key": f"{well}_{field}", "plate": "p", "well": well, "row": well[0], "column": well[1:], "field": field,
            "path": f"{well[0]}/{well[1:]}/{field}"}


def _ok(n, area_sum, isum, scores=None, median=10.0):
    s = {"status": "ok" if n else "empty", "n_objects": n, "field_area_px": 1000, "pixel_size_um": 0.5,
         "area_sum": area_sum, "median_area_px": median if n else None, "intensity_sums": {"DAPI": isum}}
    return s | ({"scores": scores} if scores is not None else {})


def test_well_and_plate_summaries():
    fields = [_field("A1", "0"), _field("A1", "1"), _field("A2", "0"), _field("A2", "1"), _field("B1", "0")]
    sc = (lambda m: {"msa": m, "sa50": m, "error_rate": 1 - m, "n_pred": 10, "n_true": 10, "tp50": 9})
    status = {"A1_0": _ok(10, 100.0, 50.0, sc(0.8)), "A1_1": _ok(30, 600.0, 30.0, sc(0.6)),
              "A2_0": _ok(0, 0.0, 0.0, sc(1.0)), "A2_1": {"status": "failed", "n_objects": 0, "error": "corrupt chunk"}}
    f = fields_table(fields, status)  # B1_0 never reported: missing
    assert list(f["status"]) == ["ok", "ok", "empty", "failed", "missing"]
    assert f.loc[0, "density_per_mm2"] == pytest.approx(10 / (1000 * 0.25) * 1e6)
    areas = pd.DataFrame({"plate": "p", "well": ["A1"] * 40, "area": [10.0] * 10 + [20.0] * 30})
    w = wells_table(f, areas).set_index("well")
    assert w.loc["A1", "n_objects"] == 40 and w.loc["A1", "mean_area_px"] == pytest.approx(700 / 40)
    assert w.loc["A1", "median_area_px"] == 20.0 and w.loc["A1", "mean_intensity_DAPI"] == pytest.approx(80 / 40)
    assert w.loc["A1", "msa"] == pytest.approx(0.7)
    assert (w.loc["A2", "n_empty"], w.loc["A2", "n_failed"], w.loc["A2", "objects_per_field"]) == (1, 1, 0.0)
    assert "1 failed field" in w.loc["A2", "qc"] and "1 empty field" in w.loc["A2", "qc"]
    assert w.loc["B1", "n_failed"] == 1 and np.isnan(w.loc["B1", "objects_per_field"])
    p = plate_table(f, w.reset_index(), areas).iloc[0]
    assert (p["n_wells"], p["n_fields"], p["n_ok"], p["n_empty"], p["n_failed"], p["n_objects"]) == (3, 5, 2, 1, 2, 40)
    m = metrics_table(f)
    assert m.loc[m["level"] == "plate", "msa"].item() == pytest.approx(0.8)  # mean over the 3 scored fields
    assert m.loc[(m["level"] == "well") & (m["well"] == "A1"), "tp50"].item() == 18
    assert not any(c.startswith("_") for c in public(f).columns)


def test_count_outlier_wells_are_flagged():
    fields = [_field(f"A{i}", "0") for i in range(1, 13)]
    counts = [100, 104, 98, 101, 97, 103, 99, 102, 100, 5, 100, 250]
    f = fields_table(fields, {fl["key"]: _ok(n, 10.0 * n, 1.0 * n) for fl, n in zip(fields, counts)})
    w = wells_table(f, pd.DataFrame(columns=["plate", "well", "area"]), outlier_mad=3.5)
    assert list(w.loc[w["outlier"], "well"]) == ["A10", "A12"]
    assert w.loc[w["well"] == "A10", "qc"].item().startswith("count outlier (robust z -")


def test_streamed_batch_tables_equal_one_concat(tmp_path):
    """measure writes each field's table to disk and joins them row group by row group; aggregate reads one
    row group at a time: the same objects.parquet and areas as one in-memory concat of the tables."""
    from pipeline_lib.steps.aggregate import concat_parquet, object_areas
    from pipeline_lib.steps.measure import KEY_COLUMNS, _concat_tables
    rng = np.random.default_rng(0)

    def field(well: str, n: int) -> pd.DataFrame:
        t = pd.DataFrame({"label": np.arange(1, n + 1, dtype=np.uint32), "area": rng.integers(5, 99, n),
                          "intensity_mean_DAPI": rng.random(n)})
        for i, k in enumerate(KEY_COLUMNS):
            t.insert(i, k, {"plate": "p", "well": well, "row": well[0], "column": well[1:], "field": "0"}[k])
        return t
    frames = [field("A1", 7), field("A1", 0), field("B2", 5)]
    parts = []
    for i, t in enumerate(frames):
        parts.append(str(tmp_path / f"{i}.parquet"))
        t.to_parquet(parts[-1], index=False, row_group_size=3)  # several row groups per field
    _concat_tables(parts, str(tmp_path / "batch.parquet"))
    ref = pd.concat(frames, ignore_index=True)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "batch.parquet"), ref)
    n = concat_parquet([str(tmp_path / "batch.parquet"), parts[0]], str(tmp_path / "objects.parquet"))
    both = pd.concat([ref, frames[0]], ignore_index=True)
    assert n == len(both)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "objects.parquet"), both)
    areas = object_areas([str(tmp_path / "batch.parquet"), parts[1]])
    assert areas["area"].tolist() == ref["area"].tolist()
    assert areas["well"].astype(str).tolist() == ref["well"].tolist()
    _concat_tables([], str(tmp_path / "none.parquet"))
    assert list(pd.read_parquet(tmp_path / "none.parquet").columns) == KEY_COLUMNS + ["label"]
