"""method cellpose_sam through the workflow (the method registry, flows stores, tiny model and oracle flows)."""
import json

import numpy as np
import pytest
import zarr

from conftest import run_workflow, subset_plate
from pipeline_lib.config import load_schema, validate_config
from pipeline_lib.io.ome_zarr import InputError
from pipeline_lib.io.synthetic import write_synthetic_plate
from pipeline_lib.measure.metrics import mean_segmentation_accuracy as msa
from pipeline_lib.methods import METHODS, NETWORK_SECTIONS, get_method

pytest.importorskip("cellpose", reason="the cellpose extra is part of the test extra")


def _labels(path, name=None):
    return np.asarray(zarr.open_array(f"{path}/labels/{name}/s0" if name else f"{path}/s0", mode="r"))


def test_registry_matches_schema_and_its_steps_exist():
    schema = load_schema()["properties"]
    one, many = schema["method"]["oneOf"]
    assert set(one["enum"]) == set(METHODS) | {"auto"} and set(many["items"]["enum"]) == set(METHODS)
    for m in METHODS.values():
        assert m.chain in ("predict_segment", "prompt_segment") and m.network in NETWORK_SECTIONS
        assert all(s in schema for s in m.sections + NETWORK_SECTIONS[m.network])
        assert m.store in (None, "sam_maps", "flows")
        for kind in ("segment", "instances") + (("predict",) if m.chain == "predict_segment" else ()):
            assert callable(m.step(kind)), (m.name, kind)
        assert m.resolved_params(validate_config({"input": "x", "output": "y", "method": m.name})) is not None
    from conftest import REPO
    smk = (REPO / "workflow" / "rules" / "methods.smk").read_text()
    assert all(f"module {m}:" in smk and f"use rule * from {m} exclude all as {m}_*" in smk for m in METHODS)
    cp = get_method("cellpose_sam")
    cfg = validate_config({"input": "x", "output": "y", "method": "cellpose_sam"})
    assert cp.uses_model(cfg) and not cp.needs_decoder(cfg)
    assert not cp.uses_model(dict(cfg, predictions="p"))  # flows given: mask step only, no GPU


def test_predictions_store_of_the_other_kind_is_refused(tmp_path):
    from pipeline_lib.embed.oracle import write_oracle_predictions
    from pipeline_lib.steps.plan import make_plan
    plate = tmp_path / "p.ome.zarr"
    write_synthetic_plate(plate, rows="A", columns=[1], fields=1, shape=(64, 80), nuclei=4)
    write_oracle_predictions(str(plate), "nuclei_gt", str(tmp_path / "maps.ome.zarr"))
    cfg = validate_config({"input": str(plate), "output": str(tmp_path / "o"), "method": "cellpose_sam",
                           "predictions": str(tmp_path / "maps.ome.zarr")})
    with pytest.raises(InputError, match="maps.ome.zarr.*decoder maps.*'cellpose_sam' reads Cellpose flows"):
        make_plan(cfg)
    from pipeline_lib.embed.cellpose_dynamics import write_oracle_flows
    write_oracle_flows(str(plate), "nuclei_gt", str(tmp_path / "flows.ome.zarr"))
    cfg = validate_config({"input": str(plate), "output": str(tmp_path / "o"), "method": "ais",
                           "predictions": str(tmp_path / "flows.ome.zarr")})
    with pytest.raises(InputError, match="flows.ome.zarr.*holds Cellpose flows.*'ais' reads micro-sam decoder maps"):
        make_plan(cfg)
    auto = validate_config({"input": str(plate), "output": str(tmp_path / "o"),
                            "predictions": str(tmp_path / "flows.ome.zarr")})
    assert auto["method"] == "cellpose_sam"  # auto reads the store's kind
    f = make_plan(auto)["fields"][0]
    assert f["predictions"].endswith("flows.ome.zarr/A/1/0")
    assert f["labels_by_method"] == {"cellpose_sam": f["labels"]} and f["labels"].endswith("A/1/0/labels/sam")


@pytest.mark.slow  # end-to-end through Snakemake
def test_tiny_cellpose_model_end_to_end_and_rerun_from_flows(tmp_path):
    """The GPU step on CPU with an untrained tiny CPSAM; then the mask step alone from its flows store."""
    from pipeline_lib.models.cellpose import write_tiny_cellpose
    plate = tmp_path / "p.ome.zarr"
    write_synthetic_plate(plate, rows="A", columns=[1], fields=1, shape=(160, 300), nuclei=12)
    net = write_tiny_cellpose(tmp_path / "model")
    # random weights: accept every pixel (cellprob) and every mask (flow error), so that masks do appear
    cp = {"model": net, "cellprob_threshold": -100.0, "flow_threshold": 0.0, "niter": 50, "mask_block": 160,
          "mask_halo": 32}
    cfg = {"input": str(plate), "output": str(tmp_path / "out"), "method": "cellpose_sam", "cellpose": cp,
           "model": {"device": "cpu"}, "labels": {"name": "cp"}, "ground_truth": "nuclei_gt"}
    run_workflow(cfg, tmp_path / "a")
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "cellpose_sam" and summary["status_counts"] == {"ok": 1}
    model = json.loads((out / "model.json").read_text())
    assert model["checkpoint"] == net and len(model["checkpoint_xxh128"]) == 32
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["params"]["resolved"]["cellprob_threshold"] == -100.0 and "cellpose" in prov["params"]
    preds = zarr.open_group(str(out / "predictions.ome.zarr"), mode="r")
    assert preds.attrs["pipeline_lib_predictions_kind"] == "flows"
    field = zarr.open_group(str(out / "predictions.ome.zarr" / "A" / "1" / "0"), mode="r")
    assert field["0"].shape == (3, 160, 300) and field["0"].dtype == np.float16
    assert [c["label"] for c in field.attrs["omero"]["channels"]] == ["dY", "dX", "cellprob"]
    low, high = field.attrs["cellpose_normalization"]["lowhigh"][0]
    img = np.asarray(zarr.open_array(f"{plate}/A/1/0/s0", mode="r"), np.float32).ravel()
    assert np.isclose(low, np.percentile(img, 1)) and np.isclose(high, np.percentile(img, 99))
    assert np.abs(np.asarray(field["0"], np.float32)).max() > 0
    lab = _labels(plate / "A/1/0", "cp")
    assert lab.max() > 0 and len(np.unique(lab)) == lab.max() + 1  # consecutive ids
    # the mask step re-runs from the flows store without the model (the rules' functions, in process)
    from pipeline_lib.steps.model import resolve_model
    from pipeline_lib.steps.plan import write_plan
    from pipeline_lib.steps.segment import run_segment_batch
    again = validate_config(dict(cfg, output=str(tmp_path / "out2"), predictions=str(out / "predictions.ome.zarr"),
                                 labels={"name": "cp_again"}, cellpose=dict(cp, model="/nonexistent/never/loaded")))
    assert resolve_model(again)["skipped"] is True and not get_method(again).uses_model(again)
    plan = write_plan(again, str(tmp_path / "out2" / "plan.json"))
    res = run_segment_batch(again, plan, "b0000", None, str(tmp_path / "out2" / "segment.json"))
    assert res["fields"]["A_1_0"]["n_objects"] == lab.max()
    assert np.array_equal(lab, _labels(plate / "A/1/0", "cp_again"))


@pytest.mark.slow  # end-to-end through Snakemake; cellpose's masks_to_flows costs ~15 s per field on CPU
def test_real_plate_from_oracle_flows(real_plate, tmp_path):
    """Oracle flows (cellpose's masks_to_flows of nuclei_gt, scaled as its network outputs them) of one well
    of the real plate: the workflow's mask step in small blocks against ground truth, and against cellpose's
    dynamics on the whole field. flow_threshold 0: the flow-error QC is moot for exact flows (and costs
    another masks_to_flows per field)."""
    from pipeline_lib.config import cellpose_params
    from pipeline_lib.embed.cellpose_dynamics import cellpose_masks, write_oracle_flows
    plate = subset_plate(real_plate, tmp_path / "plate.ome.zarr", ["B/4"])
    assert write_oracle_flows(str(plate), "nuclei_gt", str(tmp_path / "flows.ome.zarr")) == 2
    cfg = {"input": str(plate), "output": str(tmp_path / "out"), "method": "cellpose_sam",
           "predictions": str(tmp_path / "flows.ome.zarr"), "labels": {"name": "tiled"},
           "cellpose": {"flow_threshold": 0.0, "mask_block": 256, "mask_halo": 64}, "ground_truth": "nuclei_gt"}
    run_workflow(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["model"]["predictions_source"]["kind"] == "oracle"
    params = cellpose_params(validate_config(cfg))
    scores = []
    for f in summary["fields"]:
        gt = _labels(plate / f["path"], "nuclei_gt").reshape(520, 696)
        tiled = _labels(plate / f["path"], "tiled")
        flows = np.asarray(zarr.open_array(f"{tmp_path}/flows.ome.zarr/{f['path']}/0", mode="r"), np.float32)
        assert msa(tiled, cellpose_masks(flows, params)) >= 0.99, f["path"]  # blocks vs the whole field
        scores.append(msa(tiled, gt))
    assert len(scores) == 2
    # measured: 0.953 and 0.957 (cellpose's dynamics drop boundary pixels whose end points miss the seeds)
    assert np.mean(scores) >= 0.95, scores


@pytest.mark.slow  # the tiny network on 16 crops on CPU (~10 s)
def test_tiny_cellpose_on_a_volume(tmp_path):
    """Volumes: Cellpose-SAM per slice x tile crop (network + masks), then the existing yx stitch and 3D merge."""
    from pipeline_lib.io.synthetic_volume import write_synthetic_volume
    from pipeline_lib.models.cellpose import write_tiny_cellpose
    from pipeline_lib.testing.volume import run_volume_steps
    write_synthetic_volume(tmp_path / "vol.ome.zarr", shape=(4, 64, 60), block=(4, 64, 60), chunk=32,
                           channel_axis=False)
    cp = {"model": write_tiny_cellpose(tmp_path / "m"), "cellprob_threshold": -100.0, "flow_threshold": 0.0,
          "niter": 20, "halo": 16}
    s = run_volume_steps({"input": str(tmp_path / "vol.ome.zarr"), "output": str(tmp_path / "out"),
                          "method": "cellpose_sam", "cellpose": cp, "model": {"device": "cpu"},
                          "tiling": {"tile": 48, "halo": 8}, "volume": {"z_block": 2}, "labels": {"name": "cp"}})
    assert s["method"] == "cellpose_sam" and s["block_status_counts"].get("failed") is None
    assert s["grid"]["n_tiles"] == 4 and s["grid"]["n_slabs"] == 2
    lab = np.asarray(zarr.open_array(str(tmp_path / "vol.ome.zarr/labels/cp/s0"), mode="r"))
    assert lab.shape == (4, 64, 60) and s["n_objects"] == len(np.unique(lab[lab > 0])) > 0


def test_validate_checks_the_cellpose_model_not_the_sam_one(tmp_path):
    from pipeline_lib.config import check_runnable
    base = {"input": str(tmp_path), "output": str(tmp_path / "o"), "method": "cellpose_sam",
            "model": {"name": "no_such_sam"}}
    problems = check_runnable(validate_config(dict(base, cellpose={"model": str(tmp_path / "missing.pt")})))
    assert len(problems) == 1 and "cellpose.model" in problems[0] and "missing.pt" in problems[0]
    assert check_runnable(validate_config(base)) == []  # cpsam_v2: published, the SAM model is not used
