"""The bounded producer/consumer pipeline (engine.overlap) and the overlapped predict / APG / AMG steps:
same predictions and labels as the sequential path and as the per-field functions, a failing field is
still reported as failed, timing recorded in the marker."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
import zarr

from pipeline_lib.engine.overlap import DeviceClock, StageTimes, _union_seconds, run_pipeline


def test_pipeline_order_errors_and_sequential_path():
    def double(x):
        if x == 3:
            raise ValueError("three")
        return 2 * x

    def slow_plus(x):
        time.sleep(0.001 * (x % 3))
        return x + 1

    stages = [("double", double), ("plus", slow_plus)]
    for threaded in (True, False):
        times = StageTimes()
        outs = list(run_pipeline(range(8), stages, depth=1, threaded=threaded, times=times))
        assert [o.index for o in outs] == list(range(8))
        assert [o.value for o in outs if o.error is None] == [2 * x + 1 for x in range(8) if x != 3]
        assert isinstance(outs[3].error, ValueError) and outs[3].stage == "double" and outs[3].item == 3
        assert set(times.seconds) == {"double", "plus"}


def test_pipeline_bounds_items_in_flight_and_stops_when_closed():
    started, lock, live, peak = [], threading.Lock(), [0], [0]

    def enter(x):
        with lock:
            started.append(x)
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        return x

    gen = run_pipeline(range(50), [("a", enter), ("b", lambda x: x)], depth=2, max_in_flight=2)
    for out in gen:
        time.sleep(0.005)
        with lock:
            live[0] -= 1
        if out.index == 5:
            break
    gen.close()
    assert peak[0] <= 2
    n = len(started)
    time.sleep(0.1)
    assert len(started) == n < 50  # the threads stopped
    assert not [t for t in threading.enumerate() if t.name.startswith("pipeline-")]


def test_device_clock_counts_overlapping_calls_once():
    assert _union_seconds([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == pytest.approx(4.0)
    clock = DeviceClock(torch.device("cpu"))
    with clock.busy():
        time.sleep(0.02)
    rep = clock.report(StageTimes())
    assert 0.015 < rep["device_busy_s"] <= rep["wall_s"] and 0 < rep["device_busy_fraction"] <= 1


# ---------------------------------------------------------------------------------------- the steps


def _setup(tmp_path, tiny_model, method: str, corrupt: bool = False, shape=(60, 100), oracle: bool = False, **extra):
    from pipeline_lib.config import validate_config
    from pipeline_lib.embed.oracle import write_oracle_predictions
    from pipeline_lib.io.synthetic import write_synthetic_plate
    from pipeline_lib.steps.model import resolve_model
    from pipeline_lib.steps.plan import write_plan
    plate = tmp_path / "p.ome.zarr"
    # 2 fields (of 1 x 2 tiles at the default shape), encoder batches of 3: a batch spans both fields
    write_synthetic_plate(plate, rows="A", columns=[1, 2], fields=1, shape=shape, nuclei=4, seed=2)
    if corrupt:
        (plate / "A/2/0/s0/0/0/0").write_bytes(b"not a blosc chunk")
    cfg = {"input": str(plate), "output": str(tmp_path / "out"), "method": method,
           "tiling": {"tile": 64, "halo": 8}, "encoder": {"batch_size": 3},
           "model": {"checkpoint": tiny_model["checkpoint"], "decoder": tiny_model["decoder"], "device": "cpu"},
           "batching": {"fields_per_job": 4}, **extra}
    if oracle:
        cfg["predictions"] = str(tmp_path / "oracle.ome.zarr")
        write_oracle_predictions(str(plate), "nuclei_gt", cfg["predictions"], chunk=64)
    cfg = validate_config(cfg)
    plan = write_plan(cfg, str(tmp_path / "out" / "plan.json"))
    return cfg, plan, resolve_model(cfg, progress=False)


def _arrays(plan, key: str) -> dict[str, np.ndarray]:
    sub = "0" if key == "predictions" else "s0"  # maps; level 0 of the labels (the image's dataset path)
    return {f["key"]: np.asarray(zarr.open_array(f"{f[key]}/{sub}", mode="r")) for f in plan["fields"]}


def test_predict_overlapped_equals_predict_maps(tmp_path, tiny_model):
    """The pipelined predict step writes the maps that the sequential ``predict_maps`` computes."""
    from pipeline_lib.embed.predict import FieldTask, predict_maps
    from pipeline_lib.io.ome_zarr import Plane2D, open_field
    from pipeline_lib.steps.model import load_resolved
    from pipeline_lib.steps.predict import run_predict_batch
    cfg, plan, info = _setup(tmp_path, tiny_model, "ais")
    marker = tmp_path / "out" / "b0000.json"
    res = run_predict_batch(cfg, plan, "b0000", info, str(marker), overlap=True)
    got = _arrays(plan, "predictions")
    assert all(v["status"] == "ok" for v in res["fields"].values()) and len(res["fields"]) == 2
    timing = json.loads(marker.read_text())["timing"]
    assert timing["overlap"] and set(timing["stages_s"]) == {"read", "device", "write"}
    assert 0 < timing["device_busy_fraction"] <= 1
    model = load_resolved(info, "cpu", require_decoder=True)
    outs, tasks = {}, []
    for f in plan["fields"]:
        img = open_field(plan["input"], f["path"])
        outs[f["key"]] = np.zeros((3,) + tuple(f["shape"]), np.float16)
        tasks.append(FieldTask(f["key"], Plane2D(img, img.channel_index(cfg["channel"])), outs[f["key"]]))
    predict_maps(model, tasks, tile=64, halo=8, batch_size=3)
    assert all(np.array_equal(got[k], outs[k]) for k in outs) and all(float(np.abs(v).max()) > 0 for v in outs.values())


def test_apg_overlapped_equals_sequential(tmp_path, tiny_model):
    """APG with the decoder run in the job: same predictions and labels with the pipeline on and off."""
    from pipeline_lib.steps.prompt_segment import run_prompt_segment_batch
    cfg, plan, info = _setup(tmp_path, tiny_model, "apg", shape=(60, 60))
    marker = tmp_path / "out" / "b0000.json"
    seq = run_prompt_segment_batch(cfg, plan, "b0000", info, str(marker), overlap=False)
    ref, ref_maps = _arrays(plan, "labels"), _arrays(plan, "predictions")
    res = run_prompt_segment_batch(cfg, plan, "b0000", info, str(marker), overlap=True)
    got, maps = _arrays(plan, "labels"), _arrays(plan, "predictions")
    strip = (lambda st: {k: {a: b for a, b in v.items() if a != "seconds"} for k, v in st.items()})
    assert strip(res["fields"]) == strip(seq["fields"]) and len(res["fields"]) == 2
    assert all(np.array_equal(got[k], ref[k]) for k in ref)
    assert all(np.array_equal(maps[k], ref_maps[k]) and float(np.abs(maps[k]).max()) > 0 for k in ref_maps)
    timing = json.loads(marker.read_text())["timing"]
    assert set(timing["stages_s"]) == {"read", "device", "prompts", "write"} and timing["device_busy_s"] > 0


@pytest.mark.parametrize("method", ["apg", "amg"])
def test_prompt_segment_overlapped_equals_per_field(tmp_path, tiny_model, method):
    """The pipelined step paints the labels of the per-field functions of before (embed_field ->
    prompt_labels); APG with prompts from oracle maps, AMG with a 3 x 3 grid, so that objects are found."""
    from pipeline_lib.embed.predict import embed_field
    from pipeline_lib.embed.prompt_decoder import PromptDecoder
    from pipeline_lib.steps.model import load_resolved
    from pipeline_lib.steps.predict import field_task
    from pipeline_lib.steps.prompt_segment import prompt_labels, read_maps, run_prompt_segment_batch
    extra = {"amg": {"points_per_side": 3, "pred_iou_threshold": -1.0, "stability_score_threshold": 0.0}}
    cfg, plan, info = _setup(tmp_path, tiny_model, method, shape=(60, 60), oracle=method == "apg",
                             **(extra if method == "amg" else {}))
    res = run_prompt_segment_batch(cfg, plan, "b0000", info, str(tmp_path / "out" / "b0000.json"), overlap=True)
    got = _arrays(plan, "labels")
    assert sum(v["n_objects"] for v in res["fields"].values()) > 0
    model = load_resolved(info, "cpu", require_decoder=False)
    decoder = PromptDecoder(model.sam)
    for f in plan["fields"]:
        task = field_task(cfg, plan, f, with_predictions=False)
        blocks, emb, _ = embed_field(model, task, 64, 8, 3, "fp32", with_maps=False)
        maps = read_maps(f["predictions"]) if method == "apg" else None
        labels, _ = prompt_labels(cfg, decoder, blocks, emb, maps, tuple(task.image.shape), 64)
        assert np.array_equal(got[f["key"]].reshape(labels.shape), labels)
        assert res["fields"][f["key"]]["n_objects"] == int(labels.max())


@pytest.mark.parametrize("method", ["ais", "apg"])
def test_failing_field_is_reported_with_the_pipeline_on(tmp_path, tiny_model, method):
    from pipeline_lib.steps.predict import run_predict_batch
    from pipeline_lib.steps.prompt_segment import run_prompt_segment_batch
    cfg, plan, info = _setup(tmp_path, tiny_model, method, corrupt=True)
    run = run_predict_batch if method == "ais" else run_prompt_segment_batch
    res = run(cfg, plan, "b0000", info, str(tmp_path / "out" / "b0000.json"), overlap=True)
    key = {f["path"]: f["key"] for f in plan["fields"]}
    st = res["fields"]
    assert st[key["A/2/0"]]["status"] == "failed" and "A/2/0" in st[key["A/2/0"]]["error"]
    assert "corrupt" in st[key["A/2/0"]]["error"]
    assert [k for k, v in st.items() if v["status"] != "failed"] == [key["A/1/0"]]


@pytest.mark.parametrize("method", ["apg", "cellpose_sam"])
def test_volume_segment_overlapped_equals_sequential(tmp_path, tiny_model, method):
    """Pass 1 of a volume with its stages overlapped (read, device, instances, write in threads) writes the
    pieces and block counts of the block-by-block path, and records the device-busy fraction and stage split."""
    from pipeline_lib.config import validate_config
    from pipeline_lib.io.synthetic_volume import write_synthetic_volume
    from pipeline_lib.models.cellpose import write_tiny_cellpose
    from pipeline_lib.steps.model import resolve_model
    from pipeline_lib.steps.plan import write_plan
    from pipeline_lib.steps.volume_segment import run_volume_segment_batch
    write_synthetic_volume(tmp_path / "vol.ome.zarr", shape=(5, 80, 72), predictions=str(tmp_path / "pred.ome.zarr"),
                           block=(5, 80, 72), chunk=40, channel_axis=False)
    results = {}
    for overlap in (True, False):
        cfg = {"input": str(tmp_path / "vol.ome.zarr"), "output": str(tmp_path / f"out{overlap}"), "method": method,
               "tiling": {"tile": 48, "halo": 16}, "volume": {"z_block": 2}, "labels": {"name": f"l{overlap}"},
               "model": {"checkpoint": tiny_model["checkpoint"], "device": "cpu"}, "encoder": {"batch_size": 4}}
        if method == "apg":
            cfg["predictions"] = str(tmp_path / "pred.ome.zarr")  # prompts from oracle maps
        else:
            cfg["cellpose"] = {"model": write_tiny_cellpose(tmp_path / "cp"), "cellprob_threshold": -100.0,
                               "flow_threshold": 0.0, "niter": 20, "halo": 16}
            cfg["tiling"] = {"tile": 48, "halo": 8}
        cfg = validate_config(cfg)
        model = resolve_model(cfg, progress=False)
        plan = write_plan(cfg, str(tmp_path / f"plan{overlap}.json"))
        markers = [run_volume_segment_batch(cfg, plan, b, model, str(tmp_path / f"{b}{overlap}.json"), overlap=overlap)
                   for b in plan["batches"]]
        pieces = np.asarray(zarr.open_array(f"{plan['scratch']}/pieces.zarr", mode="r"))
        results[overlap] = (markers, pieces)
    (on, p_on), (off, p_off) = results[True], results[False]
    assert np.array_equal(p_on, p_off) and p_on.max() > 0
    for a, b in zip(on, off):
        assert {k: v["counts"] for k, v in a["blocks"].items()} == {k: v["counts"] for k, v in b["blocks"].items()}
        assert a["timing"]["overlap"] and set(a["timing"]["stages_s"]) == {"read", "device", "instances", "write"}
        assert 0 < a["timing"]["device_busy_fraction"] <= 1
