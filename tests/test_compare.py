"""Methods side by side: agreement between two label images (measure/agreement.py), the comparison step on
a synthetic plate with three "methods" (steps/compare.py), and the report's comparison section with a
headless Chromium screenshot (report/compare.py)."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from PIL import Image
from scipy import ndimage

from conftest import REPO, independent_scores, screenshot, viridis_mask
from pipeline_lib.config import validate_config
from pipeline_lib.io.ngff import create_label_image
from pipeline_lib.io.ome_zarr import Plane2DView, open_field
from pipeline_lib.io.synthetic import blob_field
from pipeline_lib.measure.agreement import block_shape, label_agreement, pairwise_agreement
from pipeline_lib.measure.metrics import segmentation_scores
from pipeline_lib.measure.summaries import fields_table, metrics_table, read_csv
from pipeline_lib.report.compare import WINNER_COLORS
from pipeline_lib.report.html import write_report
from pipeline_lib.steps.compare import method_labels, method_pairs, run_compare
from pipeline_lib.steps.plan import make_plan
from test_report import FAILED, _inputs

METHODS = ["apg", "ais", "cellpose_sam"]
MISSING = ("A/2/1", "ais")  # a label image that was never written (no summary says why)


# ----------------------------------------------------------------------------------------------- label edits


def eroded(lab: np.ndarray) -> np.ndarray:
    """Every object shrunk by one pixel (pixels whose 3x3 neighbourhood is all the same label)."""
    same = ndimage.minimum_filter(lab, 3) == ndimage.maximum_filter(lab, 3)
    return np.where(same, lab, 0).astype(np.uint32)


def merged_split(lab: np.ndarray, k: int) -> np.ndarray:
    """Objects merged in pairs (k even) or split in half along x (k odd): a method that errs by well."""
    if k % 2 == 0:
        return ((lab.astype(np.int64) + 1) // 2).astype(np.uint32)
    n = int(lab.max())
    cx = ndimage.mean(np.indices(lab.shape)[1], lab, np.arange(1, n + 1))
    right = (lab > 0) & (np.indices(lab.shape)[1] > np.concatenate([[0], cx])[lab])
    return np.where(right, lab + n, lab).astype(np.uint32)


# ----------------------------------------------------------------------------------------------- agreement


def test_hand_checked_cases():
    a = np.zeros((40, 40), np.uint32)
    a[0:10, 0:10] = 1
    assert label_agreement(a, a)["msa"] == 1.0 and label_agreement(a, a)["sa50"] == 1.0
    disjoint = np.zeros_like(a)
    disjoint[20:30, 20:30] = 1
    r = label_agreement(a, disjoint)
    assert r["msa"] == 0.0 and r["sa50"] == 0.0 and (r["n_a"], r["n_b"]) == (1, 1)
    b = np.zeros_like(a)
    b[0:10, 2:12] = 7  # IoU 80 / 120 = 0.667: matched at 0.50 .. 0.65 (4 of 10 thresholds)
    b[30:35, 30:35] = 9  # an object only b has
    r = label_agreement(a, b)
    # SA = TP / (n_a + n_b - TP) = 1 / 2 where matched, 0 / 3 elsewhere
    assert r["sa50"] == pytest.approx(0.5) and r["msa"] == pytest.approx(4 * 0.5 / 10)
    assert r["msa_a_vs_b"] == r["msa_b_vs_a"] and (r["n_a"], r["n_b"]) == (1, 2)
    empty = np.zeros_like(a)
    assert label_agreement(empty, empty)["msa"] == 1.0  # as measure/metrics: nothing to disagree on
    assert label_agreement(a, empty)["msa"] == 0.0


def test_agreement_is_metrics_both_ways_and_blockwise():
    _, lab = blob_field((150, 170), 30, seed=5)
    for other in (eroded(lab), merged_split(lab, 0), merged_split(lab, 1)):
        whole = label_agreement(lab, other)
        ref = segmentation_scores(other, lab)
        rev = segmentation_scores(lab, other)
        assert whole["msa_b_vs_a"] == pytest.approx(ref["msa"]) and whole["msa_a_vs_b"] == pytest.approx(rev["msa"])
        assert whole["msa"] == pytest.approx(independent_scores(other, lab)["msa"])
        assert whole["sa50"] == pytest.approx(ref["sa50"]) and whole["n_b"] == ref["n_pred"]
        assert 0.0 < whole["msa"] < 1.0
        blocks = label_agreement(lab, other, max_pixels=37 * 37)  # ragged blocks cutting objects
        assert blocks == pytest.approx(whole)
    vol = np.stack([lab, np.roll(lab, 3, axis=0), lab])
    assert block_shape(vol.shape, 64 * 64) == (1, 64, 64)
    assert block_shape((5, 30, 40), 10_000) == (5, 30, 40)
    assert label_agreement(vol, vol, max_pixels=50 * 50)["msa"] == 1.0
    three = pairwise_agreement({"x": lab, "y": eroded(lab), "z": lab})
    assert list(three) == [("x", "y"), ("x", "z"), ("y", "z")] and three[("x", "z")]["msa"] == 1.0
    with pytest.raises(ValueError, match="different shapes"):
        label_agreement(lab, lab[:-1])


# ----------------------------------------------------------------------------------------------- the step


def _write_labels(root: Path, path: str, name: str, lab: np.ndarray) -> None:
    """A method's label image the way the segment step writes one (NGFF image-label, 64 px chunks)."""
    img = open_field(str(root), path)
    group = create_label_image(zarr.open_group(str(root / path), mode="a"), img, name, chunks=(64, 64),
                               overwrite=True)
    Plane2DView(group[img.datasets[0]["path"]])[np.s_[:, :]] = lab


def _method_outputs(root: Path, out: Path, cfg: dict, plan: dict) -> dict:
    """Label images, summary.json (cellpose_sam) and metrics.csv of three methods; returns the arrays."""
    arrays: dict = {}
    for k, f in enumerate(plan["fields"]):
        gt = zarr.open_array(str(root / f["path"] / "labels" / "nuclei_gt" / "s0"), mode="r")[:]
        labs = {"apg": gt, "ais": eroded(gt), "cellpose_sam": merged_split(gt, k)}
        for m, lab in labs.items():
            if (f["path"], m) == MISSING:
                continue
            _write_labels(root, f["path"], f"{cfg['labels']['name']}_{m}", lab)  # failed fields too
        arrays[f["path"]] = (gt, labs)  # (their summary.json status wins over the image)
    for m in METHODS:
        status = {}
        for f in plan["fields"]:
            bad = (m == "cellpose_sam" and f["path"] == FAILED[0]) or (f["path"], m) == MISSING
            gt, labs = arrays[f["path"]]
            status[f["key"]] = ({"status": "failed", "error": "CUDA out of memory"} if bad else
                                {"status": "ok", "n_objects": int(len(np.unique(labs[m])) - 1), "field_area_px": gt.size,
                                 "area_sum": 0.0, "scores": segmentation_scores(labs[m], gt)})
        table = fields_table(plan["fields"], status)
        d = out / "methods" / m
        d.mkdir(parents=True)
        metrics_table(table).to_csv(d / "metrics.csv", index=False)
        if m == "cellpose_sam":
            (d / "summary.json").write_text(json.dumps({"fields": [
                {"path": f["path"], **status[f["key"]]} for f in plan["fields"]]}))
    return arrays


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("compare")
    root = tmp / "plate.ome.zarr"
    inputs = _inputs(root)
    out = tmp / "out"
    cfg = validate_config({"input": str(root), "output": str(out), "ground_truth": "nuclei_gt"})
    plan = make_plan(cfg)
    for f in plan["fields"]:  # a one-method plan names its own label image; these tests find <name>_<method>
        f.pop("labels_by_method", None)
    arrays = _method_outputs(root, out, cfg, plan)
    summary = run_compare(cfg, plan, METHODS, str(out))
    return {"root": root, "out": out, "cfg": cfg, "plan": plan, "arrays": arrays, "summary": summary,
            "inputs": inputs}


def test_agreement_csv_matches_metrics_per_field(compared):
    comp = compared["out"] / "comparison"
    agr = read_csv(comp / "agreement.csv")
    assert set(pd.read_csv(comp / "agreement.csv").columns) >= {"well", "field", "method_a", "method_b", "msa",
                                                                "sa50", "n_a", "n_b", "status"}
    plan = compared["plan"]
    assert len(agr) == len(plan["fields"]) * 3
    assert method_pairs(METHODS) == [("apg", "ais"), ("apg", "cellpose_sam"), ("ais", "cellpose_sam")]
    ok = agr[agr.status == "ok"]
    assert len(ok) == len(agr) - 2 - 2  # the failed field's two cellpose_sam pairs, the missing image's two
    for r in ok.itertuples():
        _, labs = compared["arrays"][r.path]
        ref = segmentation_scores(labs[r.method_b], labs[r.method_a])
        assert r.msa == pytest.approx(ref["msa"]) and r.sa50 == pytest.approx(ref["sa50"])
        assert (r.n_a, r.n_b) == tuple(len(np.unique(labs[m])) - 1 for m in (r.method_a, r.method_b))
        assert r.well == r.row + r.column
    gt_eroded = ok[(ok.method_a == "apg") & (ok.method_b == "ais")]
    assert (gt_eroded.msa > 0.3).all() and (gt_eroded.msa < 1.0).all()
    merged = ok[(ok.method_b == "cellpose_sam") & (ok.method_a == "apg")]
    assert (merged.msa < gt_eroded.msa.min()).all()  # merges/splits disagree more than a 1 px erosion


def test_failed_and_missing_fields_are_named_rows(compared):
    agr = read_csv(compared["out"] / "comparison" / "agreement.csv")
    bad = agr[agr.status != "ok"].set_index(["path", "method_a", "method_b"])
    failed = bad.loc[(FAILED[0], "apg", "cellpose_sam")]
    assert failed.status == "failed" and "cellpose_sam: failed: CUDA out of memory" in failed.error
    assert pd.isna(failed.msa)
    assert bad.loc[(FAILED[0], "ais", "cellpose_sam")].status == "failed"
    missing = bad.loc[(MISSING[0], "apg", "ais")]
    expected = method_labels(compared["cfg"], next(f for f in compared["plan"]["fields"]
                                                   if f["path"] == MISSING[0]), "ais")
    assert missing.status == "missing" and f"ais: no label image at {expected}" == missing.error
    assert (missing.status_a, missing.status_b) == ("ok", "missing") and failed.status_b == "failed"
    assert set(bad.index) == {(FAILED[0], "apg", "cellpose_sam"), (FAILED[0], "ais", "cellpose_sam"),
                              (MISSING[0], "apg", "ais"), (MISSING[0], "ais", "cellpose_sam")}
    assert compared["summary"]["status_counts"] == {"ok": len(agr) - 4, "failed": 2, "missing": 2}


def test_wells_table_and_winner(compared):
    comp = compared["out"] / "comparison"
    agr = read_csv(comp / "agreement.csv")
    wells = read_csv(comp / "wells.csv").set_index("well")
    acc = read_csv(comp / "accuracy.csv")
    ok = agr[agr.status == "ok"]
    for w, g in ok.groupby("well"):
        for (a, b), gp in g.groupby(["method_a", "method_b"]):
            assert wells.loc[w, f"agreement_{a}_vs_{b}"] == pytest.approx(gp.msa.mean())
        assert wells.loc[w, "min_agreement"] == pytest.approx(g.msa.min())
    assert wells.loc["B3", "n_failed"] == 1 and wells.loc["A2", "n_failed"] == 1 and wells.loc["A1", "n_failed"] == 0
    assert wells.n_failed_apg.sum() == 0 and wells.n_failed_ais.to_dict() == {**dict.fromkeys(wells.index, 0), "A2": 1}
    assert wells.n_failed_cellpose_sam.to_dict() == {**dict.fromkeys(wells.index, 0), "B3": 1}
    # apg is the ground truth itself: it wins every well, by its lead over the next method
    assert (wells.winner == "apg").all() and (wells.msa_apg == 1.0).all()
    second = wells[["msa_ais", "msa_cellpose_sam"]].max(axis=1)
    assert np.allclose(wells.winner_margin, 1.0 - second)
    well_acc = acc[(acc.level == "well") & (acc.method == "ais")].set_index("well")
    assert np.allclose(wells.loc[well_acc.index, "msa_ais"], well_acc.msa)
    assert set(acc.method) == set(METHODS) and (acc.loc[acc.level == "well", "row"] != "").all()
    s = compared["summary"]
    assert s["winners"] == {"apg": len(wells)} and s["accuracy"]["apg"]["msa"] == 1.0
    assert json.loads((comp / "summary.json").read_text())["agreement"] == s["agreement"]


def test_needs_two_methods_and_labels_by_method(compared, tmp_path):
    cfg, plan = compared["cfg"], compared["plan"]
    with pytest.raises(ValueError, match="at least two"):
        run_compare(cfg, plan, ["apg", "apg"], str(tmp_path))
    f = dict(plan["fields"][0])
    f["labels_by_method"] = {"x": "/somewhere/labels/x"}
    assert method_labels(cfg, f, "x") == "/somewhere/labels/x"
    assert method_labels(cfg, f, "ais").endswith(f"{f['path']}/labels/{cfg['labels']['name']}_ais")
    # the same images under other names, found through labels_by_method; no ground truth: no accuracy.csv
    one = {**plan, "fields": [dict(f, labels_by_method={
        "first": method_labels(cfg, f, "apg"), "again": method_labels(cfg, f, "apg")})]}
    s = run_compare({**cfg, "ground_truth": None}, one, ["first", "again"], str(tmp_path))
    agr = read_csv(tmp_path / "comparison" / "agreement.csv")
    assert agr.msa.tolist() == [1.0] and not s["ground_truth"] and not (tmp_path / "comparison" / "accuracy.csv").exists()


def test_volume_is_one_field(tmp_path):
    from pipeline_lib.io.ome_zarr import LeadingView, describe_store
    from pipeline_lib.io.synthetic_volume import write_synthetic_volume
    from pipeline_lib.steps.volume_plan import make_volume_plan
    root = tmp_path / "vol.ome.zarr"
    write_synthetic_volume(root, shape=(8, 64, 64), cell=(6, 16, 16), n_levels=1, chunk=64)
    cfg = validate_config({"input": str(root), "output": str(tmp_path / "out")})
    plan = make_volume_plan(cfg, describe_store(str(root)))
    plan.pop("labels_by_method", None)  # as above: the methods' label images by their suffixed names
    gt = zarr.open_array(str(root / "labels" / "nuclei_gt" / "s0"), mode="r")[:]
    labs = {"a": gt, "b": np.roll(gt, 2, axis=2)}
    img = open_field(str(root), "")
    for m, lab in labs.items():
        group = create_label_image(zarr.open_group(str(root), mode="a"), img, f"{cfg['labels']['name']}_{m}",
                                   chunks=(32, 32), overwrite=True)
        LeadingView(group[img.datasets[0]["path"]], 3)[np.s_[:, :, :]] = lab
    run_compare(cfg, plan, ["a", "b"], str(tmp_path / "out"))
    agr = read_csv(tmp_path / "out" / "comparison" / "agreement.csv")
    assert agr.status.tolist() == ["ok"] and agr.path.isna().all()
    assert agr.msa[0] == pytest.approx(segmentation_scores(labs["b"], gt)["msa"]) and 0 < agr.msa[0] < 1
    # a label image of other data (here a 2D field's): a failed row naming the shapes, not a crash
    from pipeline_lib.io.synthetic import write_synthetic_plate
    write_synthetic_plate(tmp_path / "p.ome.zarr", rows="A", columns=[1], fields=1, shape=(64, 64), nuclei=3)
    other = {**plan, "labels_by_method": {"flat": str(tmp_path / "p.ome.zarr" / "A/1/0/labels/nuclei_gt")}}
    run_compare(cfg, other, ["a", "flat"], str(tmp_path / "out"))
    row = read_csv(tmp_path / "out" / "comparison" / "agreement.csv").iloc[0]
    assert row.status == "failed" and (row.status_a, row.status_b) == ("ok", "failed")
    assert "flat: label image" in row.error and "has shape (64, 64), the other methods' (8, 64, 64)" in row.error


# ----------------------------------------------------------------------------------------------- report


@pytest.fixture(scope="module")
def compare_report(compared) -> dict:
    out = compared["out"]
    path = write_report(out, **compared["inputs"], intensity_column="DAPI", n_thumbnails=0, plate_rows=["A", "B"],
                        plate_columns=[str(i) for i in range(1, 13)])
    return {"path": path, "html": path.read_text(), "out": out}


def test_report_section(compare_report, compared, tmp_path):
    doc = compare_report["html"]
    sec = doc[doc.index('id="comparison"'):doc.index('id="qc"')]
    for text in ("Methods side by side", "Accuracy per method", "Agreement between methods",
                 "Agreement apg vs ais (mSA)", "cellpose_sam: mSA against ground truth", "Best method per well",
                 "Wells where the methods disagree most", "Fields not compared (4)", "CUDA out of memory",
                 "wells won by apg"):
        assert text in sec, text
    pngs = {p.name for p in (compare_report["out"] / "report").glob("heatmap_compare_*.png")}
    assert pngs == {f"heatmap_compare_{s}_{m}.png" for s in ("msa", "sa50") for m in METHODS} | {
        "heatmap_compare_winner.png"} | {f"heatmap_compare_agreement_{a}_vs_{b}.png" for a, b in method_pairs(METHODS)}
    assert len(re.findall(r"<img\b", sec)) == len(pngs)
    # the disagreement list starts with the well of the lowest field agreement
    wells = read_csv(compared["out"] / "comparison" / "wells.csv")
    worst = wells.sort_values("min_agreement").iloc[0]
    table = sec[sec.index("disagree most"):]
    assert re.search(r"<tbody><tr><td>([A-Z]\d)</td>", table).group(1) == worst.well
    # a single-method report (no comparison/ next to it) has no such section
    single = write_report(tmp_path, **compared["inputs"], n_thumbnails=0)
    assert 'id="comparison"' not in single.read_text()
    # and one given explicitly is shown
    other = write_report(tmp_path / "x", **compared["inputs"], n_thumbnails=0,
                         comparison=compared["out"] / "comparison")
    assert 'id="comparison"' in other.read_text()


def test_screenshot_shows_comparison(compare_report, compared, tmp_path):
    """The section as Chromium draws it; the picture for the README (docs/report_compare.png) is written
    when it is missing or with UPDATE_DOCS=1, so that a test run leaves the checkout as it was."""
    doc = compare_report["html"].replace(str(compared["root"].parent), "/data/screen")  # no tmp paths shown
    only = tmp_path / "compare.html"  # the page cut to its header and comparison section
    only.write_text(doc[:doc.index('<section id="summary"')] + doc[doc.index('<section id="comparison"'):
                                                                     doc.index('<section id="qc"')] + "</body></html>")
    shot = tmp_path / "compare.png"
    screenshot(only, shot, height=2600)
    rgb = np.asarray(Image.open(shot).convert("RGB"))
    viridis = viridis_mask(rgb)
    win = np.array([int(WINNER_COLORS[0][k:k + 2], 16) for k in (1, 3, 5)])
    winner = (np.abs(rgb.astype(int) - win).max(axis=2) <= 3).sum()
    print(f"screenshot {rgb.shape[1]}x{rgb.shape[0]}: {viridis.sum()} heatmap px, {winner} winner px")
    assert rgb.std() > 10, "blank screenshot"
    assert viridis.sum() > 20_000, "heatmap colours not visible in the screenshot"
    assert winner > 1_000, "winner map not visible in the screenshot"
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r"<img\b[^>]*>", "", only.read_text()))
    screenshot(bare, tmp_path / "bare.png", height=2600)
    assert viridis_mask(np.asarray(Image.open(tmp_path / "bare.png").convert("RGB"))).sum() < 200
    crop = rgb[: int(np.nonzero(rgb.min(axis=2) < 250)[0].max()) + 20]  # without the blank page below
    docs = REPO / "docs" / "report_compare.png"
    if os.environ.get("UPDATE_DOCS") or not docs.exists():
        Image.fromarray(crop).save(docs, optimize=True)
        assert docs.stat().st_size > 10_000
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


# ----------------------------------------------------------------------------------------------- volumes
def test_volume_methods_are_compared_as_one_image(tmp_path, tiny_model):
    """Two methods on one volume (AIS and APG from the same oracle maps, APG with the tiny SAM; the passes
    the rules run, in process): methods.json indexes the volume as one image, the comparison scores the
    pair on the 3D label images, and report.html shows the pair table instead of plate maps."""
    from pipeline_lib.io.synthetic_volume import write_synthetic_volume
    from pipeline_lib.methods import method_config, methods_index
    from pipeline_lib.report.compare import write_comparison_report
    from pipeline_lib.testing.volume import run_volume_steps
    write_synthetic_volume(tmp_path / "vol.ome.zarr", shape=(6, 80, 72), predictions=str(tmp_path / "pred.ome.zarr"),
                           block=(6, 80, 72), chunk=40, channel_axis=False)
    methods = ["ais", "apg"]
    multi = validate_config({"input": str(tmp_path / "vol.ome.zarr"), "output": str(tmp_path / "out"),
                             "method": methods, "model": {"checkpoint": tiny_model["checkpoint"], "device": "cpu"},
                             "tiling": {"tile": 48, "halo": 16}, "volume": {"z_block": 4}})
    plans = {}
    for m in methods:  # each method's module config, with the oracle maps as its predictions
        cfg = dict(method_config(multi, m), predictions=str(tmp_path / "pred.ome.zarr"))
        summary = run_volume_steps(cfg)
        assert summary["method"] == m and summary["n_objects"] > 0
        plans[m] = json.loads(Path(cfg["output"], "plan.json").read_text())
    index = methods_index(multi, plans)
    assert [f["labels_by_method"] for f in index["fields"]] == [
        {m: str(tmp_path / "vol.ome.zarr" / "labels" / f"sam_{m}") for m in methods}]
    summary = run_compare(multi, index, methods, str(tmp_path / "out"))
    assert summary["kind"] == "image" and summary["status_counts"] == {"ok": 1}
    row = pd.read_csv(tmp_path / "out" / "comparison" / "agreement.csv").iloc[0]
    a, b = (np.asarray(zarr.open_array(str(tmp_path / f"vol.ome.zarr/labels/sam_{m}/s0"), mode="r")) for m in methods)
    assert a.ndim == 3 and np.isclose(row["msa_b_vs_a"], segmentation_scores(b, a)["msa"])  # 3D, b against a
    html = write_comparison_report(tmp_path / "out", methods).read_text()
    assert "<h1>Methods side by side \u2013 vol.ome.zarr</h1>" in html and "<h3>Agreement between methods</h3><table" in html
    assert "heatmap_compare" not in html
