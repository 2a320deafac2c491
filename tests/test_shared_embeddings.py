"""Several SAM methods from one encoder pass per tile (workflow/rules/methods.smk, steps/shared_embeddings.py):
`method: [apg, ais, amg]` through Snakemake writes the same labels, maps and field statuses as each method
alone (its own batch steps, called directly), runs no GPU job of its own for any of them, names the shared
job in each method's marker, and a retired batch of one method recomputes the shared job."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml
import zarr

from conftest import REPO, run_workflow
from pipeline_lib.config import validate_config
from pipeline_lib.io.synthetic import write_synthetic_plate
from pipeline_lib.methods import get_method, shared_embeddings

METHODS = ["apg", "ais", "amg"]


def test_which_methods_share_embeddings():
    def shared(methods):
        return shared_embeddings(validate_config({"input": "x", "output": "y", "method": methods}))
    assert shared(METHODS) == {"lead": "apg", "methods": METHODS, "embeddings": "sam"}
    assert shared(["ais", "cellpose_sam", "amg"]) == {"lead": "amg", "methods": ["ais", "amg"], "embeddings": "sam"}
    assert shared(["ais", "cellpose_sam"]) is None and shared(["apg", "cellpose_sam"]) is None
    assert shared("apg") is None and shared(["amg"]) is None
    smk = (REPO / "workflow" / "rules" / "methods.smk").read_text()
    for m in METHODS:  # a sharer's module leaves out its GPU rule (the registry names it)
        assert f"use rule * from {m} exclude all, {get_method(m).network_rule} as {m}_*" in smk


def _labels(image: str, name: str) -> np.ndarray:
    return np.asarray(zarr.open_array(f"{image}/labels/{name}/s0", mode="r"))


def _maps(field_predictions: str) -> np.ndarray:
    return np.asarray(zarr.open_array(f"{field_predictions}/0", mode="r"))


def _status(fields: dict) -> dict:
    return {k: {n: v for n, v in s.items() if n != "seconds"} for k, s in fields.items()}


def _alone(cfg: dict, batch: str) -> tuple[dict, dict]:
    """One method alone by its own batch steps (what its rules call): (plan, segment marker)."""
    from pipeline_lib.steps.model import resolve_model
    from pipeline_lib.steps.plan import write_plan
    out = cfg["output"]
    plan = write_plan(cfg, f"{out}/plan.json")
    spec, model = get_method(cfg), resolve_model(cfg)
    if spec.chain == "predict_segment":
        spec.step("predict")(cfg, plan, batch, model, f"{out}/predict.json")
        return plan, spec.step("segment")(cfg, plan, batch, f"{out}/predict.json", f"{out}/segment.json")
    return plan, spec.step("segment")(cfg, plan, batch, model, f"{out}/segment.json")


def test_failures_are_named_per_method(tiny_model, tmp_path):
    """The shared job in process: a field that cannot be read fails every method with the reader's error; a
    label image of one method held by another run fails that method's field only; the adopted markers."""
    import os
    import shutil

    from pipeline_lib.io.locks import _proc_start
    from pipeline_lib.methods import method_config
    from pipeline_lib.steps.model import resolve_model
    from pipeline_lib.steps.plan import lock_path, write_plan
    from pipeline_lib.steps.shared_embeddings import adopt_shared_batch, run_shared_batch
    plate = tmp_path / "p.ome.zarr"
    write_synthetic_plate(plate, rows="A", columns=[1], fields=2, shape=(64, 80), nuclei=3)
    shutil.rmtree(plate / "A" / "1" / "1" / "s0" / "0")  # field 1: its only chunk is gone
    cfg = validate_config({"input": str(plate), "output": str(tmp_path / "out"), "method": METHODS,
                           "model": {"checkpoint": tiny_model["checkpoint"], "decoder": tiny_model["decoder"],
                                     "device": "cpu"}, "tiling": {"tile": 128, "halo": 16},
                           "apg": {"foreground_threshold": 0.55, "center_distance_threshold": 0.66,
                                   "boundary_distance_threshold": 0.66},
                           "amg": {"points_per_side": 1, "pred_iou_threshold": -1.0, "stability_score_threshold": 0.0}})
    plans = {}
    for m in METHODS:
        c = method_config(cfg, m)
        plans[m] = write_plan(c, os.path.join(c["output"], "plan.json"))
    held = lock_path(plans["amg"]["fields"][0])  # another live run (this process) writes AMG's labels of field 0
    with open(held, "w") as f:
        json.dump({"output": "/another/run", "host": os.uname().nodename, "pid": os.getpid(),
                   "pid_start": _proc_start(os.getpid())}, f)
    job = str(tmp_path / "out" / "jobs" / "shared_embeddings" / "b0000.json")
    model = resolve_model(method_config(cfg, "apg"))
    res = run_shared_batch(cfg, shared_embeddings(cfg), plans, "b0000", model, job, overlap=False)
    by = {m: res["by_method"][m]["fields"] for m in METHODS}
    for m in METHODS:
        assert by[m]["A_1_1"]["status"] == "failed" and "A/1/1/s0" in by[m]["A_1_1"]["error"], by[m]
        marker = adopt_shared_batch(job, m, str(tmp_path / m / "b0000.json"))
        assert marker["fields"] == by[m] and marker["embeddings"]["from_job"] == job
    assert by["amg"]["A_1_0"]["status"] == "failed" and "/another/run" in by["amg"]["A_1_0"]["error"]
    assert by["apg"]["A_1_0"]["status"] in ("ok", "empty") and by["ais"]["A_1_0"] == {"status": "ok"}
    assert np.asarray(_maps(plans["ais"]["fields"][0]["predictions"]), np.float32).max() > 0


ALL = METHODS + ["cellpose_sam"]


@pytest.mark.slow  # end-to-end through Snakemake: four methods, tiny models, three real fields in one batch
def test_methods_side_by_side_share_embeddings_on_real_fields(real_plate, tiny_model, tmp_path):
    """`method: [apg, ais, amg, cellpose_sam]` on wells A/2 and B/4 of the real plate (3 fields; tiny random
    models, thresholds that let them find objects): every method's label image, outputs and metrics; the SAM
    methods from one shared encoder pass with the labels, maps and statuses of each method alone; methods.json,
    the comparison against the ground truth and report.html's comparison page (Chromium); a retired batch
    of one sharer recomputes the shared job; the GPU only in the network jobs of the slurm-style resources."""
    from conftest import chromium, screenshot, subset_plate
    import pandas as pd

    from pipeline_lib.models.cellpose import write_tiny_cellpose
    plate = subset_plate(real_plate, tmp_path / "p.ome.zarr", ["A/2", "B/4"])
    out = tmp_path / "out"
    base = {"input": str(plate), "output": str(out), "ground_truth": "nuclei_gt",
            "model": {"checkpoint": tiny_model["checkpoint"], "decoder": tiny_model["decoder"], "device": "cpu"},
            "tiling": {"tile": 1024, "halo": 64},  # one tile per field; random weights: thresholds that give objects
            "apg": {"foreground_threshold": 0.55, "center_distance_threshold": 0.66, "boundary_distance_threshold": 0.66,
                    "min_size": 0},
            "ais": {"foreground_threshold": 0.0, "center_distance_threshold": 1.0, "boundary_distance_threshold": 1.0},
            "amg": {"points_per_side": 2, "pred_iou_threshold": -1.0, "stability_score_threshold": 0.0},
            "cellpose": {"model": write_tiny_cellpose(tmp_path / "cp"), "cellprob_threshold": -100.0,
                         "flow_threshold": 0.0, "niter": 20}}
    run_workflow(dict(base, method=ALL), tmp_path / "wd")
    # each method's outputs
    index = json.loads((out / "methods.json").read_text())
    assert index["methods"] == ALL and len(index["fields"]) == 3
    by_method = {f["path"]: f["labels_by_method"] for f in index["fields"]}
    assert by_method["A/2/0"] == {m: f"{plate}/A/2/0/labels/sam_{m}" for m in ALL}
    for m in ALL:
        d = out / "methods" / m
        summary = json.loads((d / "summary.json").read_text())
        assert summary["method"] == m and summary["status_counts"] == {"ok": 3} and summary["n_objects"] > 0
        assert pd.read_csv(d / "metrics.csv")["msa"].notna().any()  # scored against nuclei_gt
        assert (d / "report.html").exists() and json.loads((d / "jobs" / "complete.json").read_text())["failed"] == []
        assert _labels(f"{plate}/B/4/0", f"sam_{m}").shape == (520, 696)
    assert json.loads((out / "methods" / "cellpose_sam" / "model.json").read_text())["name"] == "cpsam_tiny"
    # the SAM methods: one shared job, no GPU job of their own, each marker names it
    job = out / "jobs" / "shared_embeddings" / "b0000.json"
    shared = json.loads(job.read_text())
    assert (shared["lead"], shared["methods"], shared["not_shared"]) == ("apg", METHODS, [])
    for m in METHODS:
        d = out / "methods" / m
        assert not (d / "benchmarks" / "predict").exists() and not (d / "benchmarks" / "prompt_segment").exists()
        marker = json.loads((d / "jobs" / get_method(m).network_marker / "b0000.json").read_text())
        assert marker["embeddings"] == {"from_job": str(job), "lead": "apg", "shared_by": METHODS, "not_shared": []}
        assert "shared job" in marker["timing"]["embeddings_from"]
    assert (out / "methods" / "cellpose_sam" / "benchmarks" / "predict").exists()  # its own network job
    # ... with the labels, maps and statuses of each method alone (its own batch steps, called directly)
    for m in METHODS:
        cfg = validate_config(dict(base, method=m, output=str(tmp_path / "alone" / m), labels={"name": f"a_{m}"}))
        plan, alone = _alone(cfg, "b0000")
        seg = json.loads((out / "methods" / m / "jobs" / "segment" / "b0000.json").read_text())
        assert _status(alone["fields"]) == _status(seg["fields"]), m
        for f in plan["fields"]:
            lab = _labels(f["image"], f"a_{m}")
            assert lab.max() > 0 and np.array_equal(lab, _labels(f["image"], f"sam_{m}")), (m, f["key"])
            if get_method(m).store:  # APG's QC maps, the maps AIS segments
                together = f["predictions"].replace(str(tmp_path / "alone" / m), str(out / "methods" / m))
                assert np.array_equal(_maps(f["predictions"]), _maps(together)), (m, f["key"])
    # the comparison: agreement per field and pair, accuracy per method, the report page
    agreement = pd.read_csv(out / "comparison" / "agreement.csv")
    assert len(agreement) == 3 * 6 and set(agreement["status"]) == {"ok"} and agreement["msa"].between(0, 1).all()
    assert set(pd.read_csv(out / "comparison" / "accuracy.csv")["method"]) == set(ALL)
    html = (out / "report.html").read_text()
    assert 'id="comparison"' in html and all(f'href="methods/{m}/report.html"' in html for m in ALL)
    assert "<h1>Methods side by side \u2013 BBBC039" in html  # the plate's name, as each method's report
    try:
        chromium()
    except pytest.skip.Exception:
        pass
    else:
        from PIL import Image
        screenshot(out / "report.html", tmp_path / "compare.png", height=1800)
        shot = np.asarray(Image.open(tmp_path / "compare.png").convert("RGB"))
        # colour: the heatmaps' colour bars and the scored wells of the 16 x 24 plate (a page without its
        # figures is grey: < 0.001 of its pixels coloured)
        assert shot.std() > 10 and (np.abs(np.diff(shot.astype(int), axis=2)).sum(axis=2) > 60).mean() > 0.004
    # a failed field of one method retires its batch: the rerun recomputes the shared job and every adopter
    from pipeline_lib.steps.aggregate import retire_failed_batches
    amg_plan = json.loads((out / "methods" / "amg" / "plan.json").read_text())
    assert retire_failed_batches(str(out / "methods" / "amg"), amg_plan, {"A/2/0"}) == ["b0000"]
    assert not job.exists() and (job.parent / "b0000.json.failed").exists()
    (out / "methods" / "amg" / "jobs" / "complete.json").unlink()  # as its failed check_complete leaves it
    def dry_run(workdir, *extra):
        proc = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                               str(workdir), "--configfile", str(workdir / "config.yaml"), "--cores", "1",
                               "--dry-run", *extra], capture_output=True, text=True)
        text = proc.stdout + proc.stderr
        assert proc.returncode == 0, text[-3000:]
        return text, dict(re.findall(r"\nrule (\w+):\n(?:(?!\s*resources:).*\n)*\s*resources: ([^\n]*)", text))
    text, resources = dry_run(tmp_path / "wd")
    assert "gpu=1" in resources["shared_embeddings"], text[-3000:]  # the GPU job, recomputed
    for m in METHODS:  # every method's marker again, on the submit host (local rules), without a GPU
        assert "gpu" not in resources[f"{m}_adopt"] and f"{m}_predict" not in resources
        assert f"{m}_prompt_segment" not in resources
    # a profile's per-rule resources (e.g. the slurm GPU partition) reach each method's copy of the rule
    (tmp_path / "dry").mkdir()
    (tmp_path / "dry" / "config.yaml").write_text(yaml.safe_dump(dict(base, method=ALL, output=str(tmp_path / "o2"))))
    text, resources = dry_run(tmp_path / "dry", "--set-resources", "model:mem_mb=12345")
    for m in ALL:
        assert "mem_mb=12345" in resources.get(f"{m}_model", ""), (m, text[-3000:])
    with pytest.raises(Exception, match="predictions"):
        validate_config(dict(base, method=ALL, predictions=str(tmp_path)))
    assert validate_config(dict(base, method=["ais"]))["method"] == "ais"  # a list of one: today's layout
