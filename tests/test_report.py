"""The run report: plate layout, heatmaps, thumbnails, a self-contained escaped report.html, and a headless
Chromium screenshot that really shows the heatmaps (viridis pixels) and the thumbnails (magenta outlines)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from PIL import Image

from conftest import outline_mask, screenshot, viridis_mask
from pipeline_lib.io.synthetic import write_synthetic_plate
from pipeline_lib.report.heatmap import plate_format, plate_heatmap, well_grid, write_heatmaps
from pipeline_lib.report.html import write_report
from pipeline_lib.report.thumbnails import OUTLINE_RGB, choose_level, field_thumbnail, pick_fields

FAILED = ("B/3/0", "CUDA out of memory <script>alert('x')</script> & more")
EMPTY = "A/3/1"
NO_GT = "B/2/1"
OUTLIER = "A1"
PLATE = "synth<&>"


# ----------------------------------------------------------------------------------------------- fixtures


def _field_rows(root: Path, paths: list[str]) -> list[dict]:
    """fields.csv rows computed from the synthetic ground truth (used as if it were the segmentation)."""
    rows = []
    for path in paths:
        r, c, f = path.split("/")
        base = {"plate": PLATE, "well": f"{r}{c}", "row": r, "column": c, "field": f, "path": path,
                "pixel_size_um": np.nan, "density_per_mm2": np.nan, "error": ""}
        img = zarr.open_array(str(root / path / "s0"), mode="r")[:]
        lab = zarr.open_array(str(root / path / "labels" / "nuclei_gt" / "s0"), mode="r")[:]
        if path == FAILED[0]:
            rows.append({**base, "status": "failed", "error": FAILED[1], "n_objects": 0,
                         "field_area_px": lab.size})
            continue
        if path == EMPTY:
            lab = np.zeros_like(lab)
        areas = np.bincount(lab.ravel())[1:]
        areas = areas[areas > 0]
        fg = lab > 0
        rows.append({**base, "status": "ok" if areas.size else "empty", "n_objects": int(areas.size),
                     "field_area_px": lab.size,
                     "mean_area_px": float(areas.mean()) if areas.size else np.nan,
                     "median_area_px": float(np.median(areas)) if areas.size else np.nan,
                     "mean_intensity_DAPI": float(img[0][fg].mean()) if fg.any() else np.nan,
                     "mean_intensity_ch1": float(img[1][fg].mean()) if fg.any() else np.nan,
                     "msa": np.nan if path == NO_GT else 0.6 + 0.05 * (len(rows) % 6) if areas.size else 0.0})
    return rows


def _wells(fields: pd.DataFrame) -> pd.DataFrame:
    ok = fields[fields.status == "ok"]
    g = fields.groupby(["plate", "well", "row", "column"], sort=True)
    wells = pd.DataFrame({
        "n_fields": g.size(), "n_ok": g.status.apply(lambda s: (s == "ok").sum()),
        "n_empty": g.status.apply(lambda s: (s == "empty").sum()),
        "n_failed": g.status.apply(lambda s: (s == "failed").sum()), "n_objects": g.n_objects.sum()}).reset_index()
    means = ok.groupby("well")[["mean_area_px", "median_area_px", "mean_intensity_DAPI", "mean_intensity_ch1",
                                "msa"]].mean()
    wells = wells.merge(means, left_on="well", right_index=True, how="left")
    wells["objects_per_field"] = wells.n_objects / (wells.n_ok + wells.n_empty)
    wells["density_per_mm2"] = np.nan
    wells["sa50"] = wells.msa + 0.1
    wells["error_rate"] = 1 - wells.msa
    wells["outlier"] = wells.well == OUTLIER
    wells["qc"] = ""
    wells.loc[wells.outlier, "qc"] = "count outlier (robust z -5.1)"
    wells.loc[wells.n_failed > 0, "qc"] = "1 failed field"
    return wells


def _metrics(fields: pd.DataFrame, wells: pd.DataFrame) -> pd.DataFrame:
    f = fields[fields.msa.notna()].assign(level="field")
    w = wells.assign(level="well", field="")
    p = pd.DataFrame([{"level": "plate", "plate": PLATE, "well": "", "field": "", "msa": wells.msa.mean()}])
    m = pd.concat([f, w, p], ignore_index=True)
    m["sa50"], m["error_rate"] = m.msa + 0.1, 1 - m.msa
    m["n_pred"], m["n_true"], m["tp50"] = 20, 21, 18
    return m[["level", "plate", "well", "field", "msa", "sa50", "error_rate", "n_pred", "n_true", "tp50"]]


def _inputs(root: Path) -> dict:
    paths = write_synthetic_plate(root, rows="AB", columns=(1, 2, 3), fields=2, shape=(192, 240), nuclei=15,
                                  channels=2, n_levels=2, seed=3)
    fields = pd.DataFrame(_field_rows(root, paths))
    wells = _wells(fields)
    plate = pd.DataFrame([{"plate": PLATE, "n_wells": len(wells), "n_fields": len(fields),
                           "n_ok": int((fields.status == "ok").sum()), "n_empty": 1, "n_failed": 1,
                           "n_objects": int(fields.n_objects.sum()), "objects_per_field": fields.n_objects.mean(),
                           "mean_area_px": fields.mean_area_px.mean(), "median_area_px": 300.0,
                           "msa": wells.msa.mean(), "sa50": 0.8, "error_rate": 0.2, "n_outlier_wells": 1}])
    summary = {"input": str(root), "method": "apg", "model": {"name": "vit_b_lm"}, "labels_name": "sam",
               "fields": [{"plate": PLATE, "well": f"{p[0]}{p[2]}", "row": p[0], "column": p[2], "field": p[4],
                           "path": p, "image": str(root / p),
                           "labels": str(root / p / "labels" / ("missing" if p == FAILED[0] else "nuclei_gt")),
                           "status": s, "n_objects": n}
                          for p, s, n in zip(fields.path, fields.status, fields.n_objects)]}
    provenance = {"config": {"input": str(root), "output": "out<dir>", "channel": "DAPI", "method": "apg",
                             "report": {"thumbnails": 6}},
                  "config_path": "config/run.yaml",
                  "model": {"name": "vit_b_lm", "checkpoint": "/cache/vit_b_lm.pt",
                            "checkpoint_xxh128": "0123456789abcdef0123456789abcdef"},
                  "method": "apg", "params": {"center_distance_threshold": 0.5, "nms_threshold": 0.9},
                  "versions": {"pipeline_lib": "0.1.0", "torch": "2.5.1", "zarr": zarr.__version__},
                  "created": "2025-01-02T03:04:05+00:00", "host": "testhost", "command": "snakemake --cores 2"}
    return {"summary": summary, "fields": fields, "wells": wells, "plate": plate,
            "metrics": _metrics(fields, wells), "provenance": provenance}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("report")
    inputs = _inputs(tmp / "plate.ome.zarr")
    path = write_report(tmp / "out", **inputs, intensity_column="DAPI", n_thumbnails=6, plate_rows=["A", "B"],
                        plate_columns=[str(i) for i in range(1, 13)])
    return {"path": path, "html": path.read_text(), **inputs}


# ----------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("rows, cols, shape", [
    ("A", ["1"], (2, 3)), ("AB", ["1", "2", "3"], (2, 3)), ("ABC", ["4"], (3, 4)), ("AB", ["02", "12"], (8, 12)),
    ("H", ["12"], (8, 12)), ("AP", ["1", "24"], (16, 24)), (["A", "AF"], ["48"], (32, 48)),
    (["B"], ["49"], (2, 49))])
def test_plate_format_is_smallest_standard_plate(rows, cols, shape):
    row_labels, col_labels = plate_format(list(rows), cols)
    assert (len(row_labels), len(col_labels)) == shape
    assert row_labels[0] == "A" and col_labels[0] == "1" and col_labels[-1] == str(shape[1])


def test_plate_format_384_and_1536_labels():
    rows, cols = plate_format(list("ABCDEFGHIJKLMNOP"), [str(c) for c in range(1, 25)])
    assert rows == list("ABCDEFGHIJKLMNOP") and cols == [str(c) for c in range(1, 25)]
    rows, _ = plate_format(["A", "AF"], ["1"])
    assert rows[25:] == ["Z", "AA", "AB", "AC", "AD", "AE", "AF"]
    assert plate_format(["r1", "r2"], ["x"]) == (["R1", "R2"], ["x"])  # not a plate naming: kept as given


def test_well_grid_places_padded_columns_and_marks():
    wells = pd.DataFrame({"row": ["A", "B", "P"], "column": ["02", "1", "24"], "v": [1.0, 2.0, 3.0],
                          "n_failed": [1, 0, 0], "outlier": [False, True, False]})
    rows, cols = plate_format(list("AB"), ["1", "2", "24"])
    grid = well_grid(wells, "v", rows, cols)
    assert grid.shape == (16, 24) and grid[0, 1] == 1 and grid[1, 0] == 2 and grid[15, 23] == 3
    assert np.isnan(grid).sum() == 16 * 24 - 3
    import matplotlib._pylab_helpers as helpers
    fig = plate_heatmap(wells, "v", rows, cols, "v")
    assert helpers.Gcf.get_num_fig_managers() == 0  # no pyplot state
    assert len(fig.axes) == 2  # plate + colour bar


def test_write_heatmaps_pngs(tmp_path):
    wells = pd.DataFrame({"row": ["A", "B"], "column": ["1", "3"], "count": [3, 5], "msa": [0.5, 0.7]})
    paths = write_heatmaps(wells, {"count": "count", "msa": "msa", "nope": "absent"}, tmp_path)
    assert set(paths) == {"count", "msa"}
    for name, p in paths.items():
        assert p == tmp_path / f"heatmap_{name}.png"
        assert Image.open(p).format == "PNG"


# ----------------------------------------------------------------------------------------------- thumbnails


def test_choose_level_smallest_still_large_enough():
    shapes = [(2000, 1600), (1000, 800), (500, 400), (250, 200)]
    assert choose_level(shapes, 256) == 2
    assert choose_level(shapes, 1000) == 1
    assert choose_level(shapes, 4000) == 0
    assert choose_level([(300, 200), (150, 100)], 256) == 0


def test_field_thumbnail_outlines_and_fallbacks(report):
    root = Path(report["summary"]["input"])
    field = root / "A" / "1" / "0"
    rgb = field_thumbnail(field, field / "labels" / "nuclei_gt", "DAPI", max_size=128)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and max(rgb.shape[:2]) == 128
    outline = (rgb == OUTLINE_RGB).all(axis=2)
    assert outline.sum() > 100
    plain = field_thumbnail(field, field / "labels" / "nothing", 1, max_size=128)
    assert plain.shape == rgb.shape and not (plain == OUTLINE_RGB).all(axis=2).any()
    assert (plain[..., 0] == plain[..., 1]).all()  # greyscale where there are no outlines
    missing = field_thumbnail(root / "Z" / "9" / "0", None, 0, max_size=64)
    assert missing.shape == (64, 64, 3)


def test_pick_fields_deterministic_spread(report):
    fields = report["fields"]
    picked = pick_fields(fields, 6)
    assert len(picked) == 6 and picked.equals(pick_fields(fields, 6))
    assert picked.iloc[0]["path"] == FAILED[0]  # failed fields first
    ok = picked[picked.status == "ok"]
    assert ok.well.is_unique and (ok.n_objects > 0).all()
    assert ok.n_objects.max() == fields[fields.status == "ok"].groupby("well").n_objects.max().max()
    assert pick_fields(fields, 0).empty


# ----------------------------------------------------------------------------------------------- html


def test_report_self_contained(report):
    doc = report["html"]
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:|//)""", doc, re.I)
    assert "<script" not in doc.lower() and "<link" not in doc.lower() and "url(" not in doc.lower()
    srcs = re.findall(r"<img[^>]*\ssrc=\"([^\"]*)\"", doc)
    assert len(srcs) == len(re.findall(r"<img\b", doc)) >= 4 + 6
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    out = report["path"].parent
    for name in ("count", "mean_area", "intensity", "msa"):
        assert (out / "report" / f"heatmap_{name}.png").is_file()
    assert report["path"].stat().st_size < 2_000_000


def test_report_sections_and_provenance(report):
    doc = report["html"]
    for sid in ("summary", "heatmaps", "qc", "thumbnails", "metrics", "provenance"):
        assert f'id="{sid}"' in doc
    for text in ("Failed fields (1)", "Empty fields (no objects) (1)", "Flagged wells (2)",
                 "Fields without ground truth (1)", "count outlier (robust z -5.1)", "Mean intensity DAPI",
                 "mSA", "vit_b_lm", "0123456789abcdef0123456789abcdef", "checkpoint_xxh128", "config/run.yaml",
                 "center_distance_threshold: 0.5", "pipeline_lib", "2025-01-02T03:04:05+00:00", "snakemake --cores 2"):
        assert text in doc, text
    thumbs = doc[doc.index('id="thumbnails"'):doc.index('id="metrics"')]
    assert len(re.findall(r"<figure><img alt=\"[A-Z]\d / field \d", thumbs)) == 6
    assert NO_GT in doc and EMPTY in doc


def test_report_escapes_data_strings(report):
    doc = report["html"]
    assert "<script>alert" not in doc and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in doc
    assert "synth&lt;&amp;&gt;" in doc and "synth<&>" not in doc
    assert "out&lt;dir&gt;" in doc


def test_report_without_wells_or_metrics(tmp_path, report):
    empty = report["wells"].iloc[:0]
    path = write_report(tmp_path, report["summary"], report["fields"], empty, report["plate"], None,
                        {"model": {"name": "m"}}, n_thumbnails=0)
    doc = path.read_text()
    assert 'id="metrics"' not in doc and "<img" not in doc and "no well data" in doc


# ----------------------------------------------------------------------------------------------- browser


def test_screenshot_shows_heatmaps_and_thumbnails(report, tmp_path):
    shot = tmp_path / "report.png"
    seconds = screenshot(report["path"], shot)
    rgb = np.asarray(Image.open(shot).convert("RGB"))
    viridis, outline = viridis_mask(rgb), outline_mask(rgb)
    print(f"screenshot {rgb.shape[1]}x{rgb.shape[0]} in {seconds:.1f}s: {viridis.sum()} heatmap px, "
          f"{outline.sum()} outline px")
    assert viridis.sum() > 20_000, "heatmap colours not visible in the screenshot"
    assert outline.sum() > 2_000, "thumbnail outlines not visible in the screenshot"
    # heatmaps come before the thumbnails on the page
    assert np.median(np.nonzero(viridis)[0]) < np.median(np.nonzero(outline)[0])
    # the same page without its images shows neither: the counts above come from the pictures
    bare = tmp_path / "bare" / "report.html"
    bare.parent.mkdir()
    bare.write_text(re.sub(r"<img\b[^>]*>", "", report["html"]))
    screenshot(bare, tmp_path / "bare.png")
    control = np.asarray(Image.open(tmp_path / "bare.png").convert("RGB"))
    assert viridis_mask(control).sum() < 200 and outline_mask(control).sum() < 50
