"""Report and table details: an all-empty plate, a constant heatmap, string keys in every table, plate names."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from pipeline_lib.io.ome_zarr import describe_store
from pipeline_lib.io.synthetic import write_synthetic_plate
from pipeline_lib.measure.summaries import fields_table, metrics_table, public, read_csv, wells_table
from pipeline_lib.report.heatmap import plate_heatmap
from pipeline_lib.report.thumbnails import pick_fields


def _plan_fields(columns=("01", "02"), fields=("0", "1")) -> list[dict]:
    return [{"plate": "p", "well": f"A{c}", "row": "A", "column": c, "field": f, "path": f"A/{c}/{f}",
             "key": f"A/{c}/{f}"} for c in columns for f in fields]


def _status(plan: list[dict], n: int) -> dict:
    return {f["key"]: {"status": "ok" if n else "empty", "n_objects": n, "field_area_px": 1000.0, "area_sum": 50.0 * n,
                       "median_area_px": 50.0, "intensity_sums": {"DAPI": 10.0 * n},
                       "scores": {"msa": 1.0, "sa50": 1.0, "error_rate": 0.0, "n_pred": n, "n_true": n, "tp50": n}}
            for f in plan}


def test_all_empty_plate_thumbnails_are_real_fields_not_nan_rows():
    fields = public(fields_table(_plan_fields(), _status(_plan_fields(), 0)))
    chosen = pick_fields(fields, 3)
    assert len(chosen) == 3 and chosen["path"].notna().all() and chosen["well"].notna().all()
    assert set(chosen["path"]) <= set(fields["path"]) and (chosen["status"] == "empty").all()


def test_constant_heatmap_scale_does_not_go_negative():
    plan = _plan_fields()
    wells = wells_table(fields_table(plan, _status(plan, 0)), pd.DataFrame(columns=["plate", "well", "area"]))
    fig = plate_heatmap(wells, "n_objects", ["A", "B"], ["1", "2", "3"], "objects")
    assert fig.axes[0].images[0].get_clim() == (0.0, 1.0)
    fig = plate_heatmap(wells.assign(n_objects=40), "n_objects", ["A", "B"], ["1", "2", "3"], "objects")
    assert fig.axes[0].images[0].get_clim() == (39.5, 40.5)


def test_csv_keys_read_back_as_the_strings_of_objects_parquet(tmp_path):
    """Plate coordinates such as column '01' stay strings from the plan through the CSVs, so they merge."""
    plan = _plan_fields()
    fields = fields_table(plan, _status(plan, 3))
    public(fields).to_csv(tmp_path / "fields.csv", index=False)  # as steps.aggregate writes them
    metrics_table(fields).to_csv(tmp_path / "metrics.csv", index=False)
    back = read_csv(str(tmp_path / "fields.csv"))
    assert back["column"].tolist() == ["01", "01", "02", "02"] and back["field"].tolist() == ["0", "1", "0", "1"]
    objects = pd.DataFrame({k: [f[k] for f in plan] for k in ("plate", "well", "row", "column", "field")})
    merged = objects.merge(back, on=["plate", "well", "row", "column", "field"], validate="one_to_one")
    assert len(merged) == len(plan)
    m = read_csv(str(tmp_path / "metrics.csv"))
    assert m.loc[m["level"] == "field", "field"].tolist() == ["0", "1", "0", "1"]


def test_plate_is_named_by_its_ngff_name_else_its_folder(tmp_path):
    store = tmp_path / "folder_name.ome.zarr"
    write_synthetic_plate(store, rows="A", columns=[1], fields=1, shape=(32, 32), nuclei=1)
    assert {f.plate for f in describe_store(store).fields} == {"folder_name"}  # plate.name is the folder's
    attrs = json.loads((store / ".zattrs").read_text())
    attrs["plate"]["name"] = "Screen 7, plate 2"
    (store / ".zattrs").write_text(json.dumps(attrs))
    assert {f.plate for f in describe_store(store).fields} == {"Screen 7, plate 2"}
    del attrs["plate"]["name"]
    (store / ".zattrs").write_text(json.dumps(attrs))
    assert {f.plate for f in describe_store(store).fields} == {"folder_name"}
    assert np.all([f.column == "1" for f in describe_store(store).fields])
