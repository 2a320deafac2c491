"""Bad input and concurrent runs (issue 15): the right answer or a clear error naming the file and the fix,
never a silent wrong answer; a rerun after the fix recomputes exactly what was affected; what was written
earlier is left as it was (hashed before and after)."""
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from conftest import REPO, run_workflow
from pipeline_lib.config import ConfigError, validate_config
from pipeline_lib.embed.oracle import write_oracle_predictions
from pipeline_lib.io.locks import LockedError
from pipeline_lib.io.ome_zarr import InputError, describe_store
from pipeline_lib.io.synthetic import write_synthetic_plate
from pipeline_lib.steps.plan import lock_path, make_plan, release_labels, write_plan
from pipeline_lib.steps.segment import run_segment_batch


# ---------------------------------------------------------------------------------------------- helpers


def tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def assert_unchanged(before: dict[str, str], root: Path) -> None:
    """Every file hashed earlier is still there, byte for byte (the ``labels`` / ``tables`` listings may
    gain a name)."""
    after = tree_hash(root)
    listing = re.compile(r"(labels|tables)/(\.zattrs|zarr\.json)$")
    changed = [k for k, v in before.items() if after.get(k) != v and not listing.search(k)]
    assert not changed, changed[:10]


@pytest.fixture
def plate(tmp_path):
    """A small writable plate (2 wells x 1 field, NGFF 0.4) and oracle predictions from its ground truth."""
    p = tmp_path / "plate.ome.zarr"
    write_synthetic_plate(p, rows="A", columns=[1, 2], fields=1, shape=(96, 128), nuclei=6)
    write_oracle_predictions(str(p), "nuclei_gt", str(tmp_path / "pred.ome.zarr"))
    return p


def base_cfg(plate: Path, out: Path, **kw) -> dict:
    cfg = {"input": str(plate), "output": str(out), "predictions": str(plate.parent / "pred.ome.zarr"),
           "tiling": {"tile": 64, "halo": 16}, "batching": {"fields_per_job": 1}}
    cfg.update(kw)
    return cfg


def field(plan: dict, path: str) -> dict:
    return next(f for f in plan["fields"] if f["path"] == path)


def batch_of(plan: dict, path: str) -> str:
    i = next(i for i, f in enumerate(plan["fields"]) if f["path"] == path)
    return next(b for b, idx in plan["batches"].items() if i in idx)


# ---------------------------------------------------------------------------------------------- 1. axes


def test_axes_that_do_not_match_the_array_fail_the_field_naming_the_fix(plate, tmp_path, capfd):
    zattrs = plate / "A/2/0/.zattrs"
    meta = json.loads(zattrs.read_text())
    ms = meta["multiscales"][0]
    ms["axes"] = ms["axes"][1:]  # [y, x] on (1, 96, 128) arrays
    for d in ms["datasets"]:
        d["coordinateTransformations"][0]["scale"] = d["coordinateTransformations"][0]["scale"][1:]
    zattrs.write_text(json.dumps(meta))
    before = tree_hash(plate)
    cfg = validate_config(base_cfg(plate, tmp_path / "out"))
    plan = write_plan(cfg, str(tmp_path / "out/plan.json"))
    err = field(plan, "A/2/0")["error"]
    assert "A/2/0" in err and "axes ['y', 'x']" in err and "has 3" in err and str(zattrs) in err
    assert "error" not in field(plan, "A/1/0")
    status = run_segment_batch(cfg, plan, batch_of(plan, "A/2/0"), None, str(tmp_path / "seg.json"))
    assert status["fields"]["A_2_0"]["status"] == "failed" and "axes" in status["fields"]["A_2_0"]["error"]
    assert not (plate / "A/2/0/labels/sam").exists()  # no 1 x 96 strip written as labels
    # 10. logs: one line for the failed field, no traceback
    log = capfd.readouterr().err
    assert len([ln for ln in log.splitlines() if "A_2_0 failed" in ln]) == 1 and "Traceback" not in log
    assert_unchanged(before, plate)


# ---------------------------------------------------------------------------------------------- 2. locks


def test_a_second_run_on_the_same_labels_is_refused_naming_the_first(plate, tmp_path):
    cfg_a = validate_config(base_cfg(plate, tmp_path / "a"))
    cfg_b = validate_config(base_cfg(plate, tmp_path / "b"))
    plan_a = write_plan(cfg_a, str(tmp_path / "a/plan.json"))
    run_segment_batch(cfg_a, plan_a, "b0000", None, str(tmp_path / "a/seg0.json"))
    before = tree_hash(plate)
    with pytest.raises(LockedError) as e:
        write_plan(cfg_b, str(tmp_path / "b/plan.json"))
    msg = str(e.value)
    assert str(tmp_path / "a") in msg and "labels.name" in msg and "sam.lock" in msg and "-delete" in msg
    assert not (tmp_path / "b/plan.json").exists()
    # a job of the other run (say, started by hand) is refused before it writes
    plan_b = make_plan(cfg_b)
    s = run_segment_batch(cfg_b, plan_b, "b0000", None, str(tmp_path / "b/seg0.json"))["fields"]["A_1_0"]
    assert s["status"] == "failed" and "being written by another run" in s["error"]
    assert_unchanged(before, plate)
    # the holder carries on; once it is complete its locks are gone and the other run may write
    assert run_segment_batch(cfg_a, plan_a, "b0001", None, str(tmp_path / "a/seg1.json"))["fields"]["A_2_0"][
        "status"] == "ok"
    assert release_labels(cfg_a, plan_a) == 2
    write_plan(cfg_b, str(tmp_path / "b/plan.json"))
    assert str(tmp_path / "b") in Path(lock_path(field(plan_b, "A/1/0"))).read_text()


def test_a_stale_lock_of_a_dead_run_on_this_host_is_taken_over(plate, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cfg = validate_config(base_cfg(plate, tmp_path / "out"))
    plan = make_plan(cfg)
    lock = Path(lock_path(plan["fields"][0]))
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"output": "/elsewhere", "host": socket.gethostname(), "pid": dead.pid,
                                "pid_start": "1", "time": "then"}))
    write_plan(cfg, str(tmp_path / "out/plan.json"))
    assert json.loads(lock.read_text())["output"] == str(tmp_path / "out")


_ADD_NAMES = """
import sys, zarr
from pipeline_lib.io.ome_zarr import create_label_image, open_field
img = open_field(sys.argv[1], "A/1/0")
for k in range(4):
    create_label_image(zarr.open_group(img.path, mode="a"), img, f"{sys.argv[2]}_{k}", chunks=(64, 64))
"""


def test_concurrent_jobs_do_not_lose_each_others_label_names(plate):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", _ADD_NAMES, str(plate), f"run{i}"], env=env) for i in range(6)]
    assert all(p.wait() == 0 for p in procs)
    names = zarr.open_group(str(plate / "A/1/0/labels"), mode="r").attrs["labels"]
    assert sorted(names) == sorted(["nuclei_gt"] + [f"run{i}_{k}" for i in range(6) for k in range(4)])


@pytest.mark.slow
def test_two_workflows_on_the_same_plate_at_once_end_correct_or_refused(tmp_path):
    """Fault injection: two Snakemake runs (same plate copy, same labels.name) started together."""
    plate = tmp_path / "plate.ome.zarr"
    write_synthetic_plate(plate, rows="A", columns=[1, 2], fields=1, shape=(96, 128), nuclei=6)
    write_oracle_predictions(str(plate), "nuclei_gt", str(tmp_path / "pred.ome.zarr"))
    ref_cfg = validate_config(base_cfg(plate, tmp_path / "ref", labels={"name": "ref"}))
    ref_plan = write_plan(ref_cfg, str(tmp_path / "ref/plan.json"))
    ref_objects = 0  # the reference labels, written by the same steps one after the other
    for b in ref_plan["batches"]:
        status = run_segment_batch(ref_cfg, ref_plan, b, None, str(tmp_path / f"ref/{b}.json"))["fields"]
        ref_objects += sum(s["n_objects"] for s in status.values())
    release_labels(ref_cfg, ref_plan)
    before = tree_hash(plate)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = {}
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        (d / "config.yaml").write_text(json.dumps(base_cfg(plate, d / "out", batching={"fields_per_job": 2})))
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(d),
               "--configfile", str(d / "config.yaml"), "--cores", "2", "--quiet", "rules"]
        procs[name] = (cmd, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             text=True))
    results = {name: (p.communicate()[0], p.returncode)[::-1] for name, (_, p) in procs.items()}
    ok = [n for n, (rc, _) in results.items() if rc == 0]
    print(f"concurrent runs: {'both completed' if len(ok) == 2 else f'{ok[0]} completed, the other was refused'}")
    assert ok, results
    for n in set(results) - set(ok):  # refused, naming the other run
        other = str(tmp_path / ({"a", "b"} - {n}).pop() / "out")
        assert "being written by another run" in results[n][1] and other in results[n][1], results[n][1][-3000:]
        assert not (tmp_path / n / "out/jobs/segment").exists()  # refused before any job
        rerun = subprocess.run(procs[n][0], env=env, capture_output=True, text=True)  # after the other is done
        assert rerun.returncode == 0, rerun.stderr[-3000:]
    from pipeline_lib.io.tables import read_feature_table
    for n in ("a", "b"):
        summary = json.loads((tmp_path / n / "out/summary.json").read_text())
        assert summary["status_counts"] == {"ok": 2}
        assert len(pd.read_parquet(tmp_path / n / "out/objects.parquet")) == ref_objects
    for f in summary["fields"]:  # the shared labels and tables are whole and equal the reference
        g = zarr.open_group(f["labels"], mode="r")
        ref = zarr.open_group(f["labels"].replace("labels/sam", "labels/ref"), mode="r")
        for lvl in ("s0", "s1"):
            assert np.array_equal(np.asarray(g[lvl]), np.asarray(ref[lvl])), (f["path"], lvl)
        table = read_feature_table(f["image"], "sam")
        assert len(table) == f["n_objects"] and len(table.columns) > 10
        assert not Path(lock_path(f)).exists()  # both runs complete: no lock left behind
    assert_unchanged(before, plate)


# ------------------------------------------------------------------------- 3./4. plan errors, missing chunks


@pytest.mark.slow
def test_a_field_missing_at_plan_time_is_redone_once_it_is_back(plate, tmp_path):
    cfg = base_cfg(plate, tmp_path / "out")
    shutil.move(plate / "A/2/0", tmp_path / "moved")
    first = run_workflow(cfg, tmp_path, check=False)
    assert first.returncode != 0 and "A/2/0: failed" in first.stderr
    jobs = tmp_path / "out/jobs"
    kept = {p: p.stat().st_mtime_ns for p in jobs.glob("*/b0000.json")}
    good = tree_hash(plate / "A/1/0/labels/sam")
    shutil.move(tmp_path / "moved", plate / "A/2/0")  # the data is fixed
    run_workflow(cfg, tmp_path)
    fields = {f["path"]: f for f in json.loads((tmp_path / "out/summary.json").read_text())["fields"]}
    assert fields["A/2/0"]["status"] == "ok" and fields["A/2/0"]["n_objects"] > 0
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # the good batch was not redone
    assert tree_hash(plate / "A/1/0/labels/sam") == good


def test_missing_image_chunk_fails_the_field_naming_it_and_is_redone_when_back(plate, tmp_path):
    chunk = plate / "A/2/0/s0/0/0/0"
    saved = chunk.read_bytes()
    chunk.unlink()
    before = tree_hash(plate)
    cfg = validate_config(base_cfg(plate, tmp_path / "out"))
    plan = write_plan(cfg, str(tmp_path / "out/plan.json"))
    err = field(plan, "A/2/0")["error"]
    assert "1 chunk(s) missing (0/0/0)" in err and str(plate / "A/2/0/s0") in err and "missing_chunks" in err
    b = batch_of(plan, "A/2/0")
    assert run_segment_batch(cfg, plan, b, None, str(tmp_path / "s.json"))["fields"]["A_2_0"]["status"] == "failed"
    assert_unchanged(before, plate)
    chunk.write_bytes(saved)  # back: the same plan's job re-checks the field and segments it
    s = run_segment_batch(cfg, plan, b, None, str(tmp_path / "s.json"))["fields"]["A_2_0"]
    assert s["status"] == "ok" and s["n_objects"] > 0
    # missing_chunks: fill accepts them (writers that skip empty chunks)
    chunk.unlink()
    assert "error" not in field(make_plan(validate_config(base_cfg(plate, tmp_path / "o2", missing_chunks="fill"))),
                                "A/2/0")


# ---------------------------------------------------------------------------------------------- 5. NaN / inf


def test_nan_and_inf_are_left_out_of_normalisation():
    from pipeline_lib.embed.preprocess import to_rgb_uint8
    rng = np.random.default_rng(0)
    img = rng.uniform(10, 500, size=(40, 50)).astype(np.float32)
    bad = img.copy()
    bad[3, 4], bad[20, 30] = np.nan, np.inf
    filled = img.copy()
    filled[3, 4] = filled[20, 30] = img[5, 5]  # a finite value inside the range: same min and max
    out, want = to_rgb_uint8(bad), to_rgb_uint8(filled)
    keep = np.isfinite(bad)
    assert np.array_equal(out[keep], want[keep]) and (out[~keep] == 0).all()
    assert len(np.unique(out)) > 100  # not one grey tile
    assert np.array_equal(to_rgb_uint8(img), to_rgb_uint8(img.copy()))


def test_nan_pixels_are_left_out_of_intensity_means_and_reported():
    from pipeline_lib.measure.regionprops import measure_labels
    from pipeline_lib.measure.summaries import fields_table, wells_table
    from pipeline_lib.steps.measure import field_summary
    labels = np.zeros((30, 40), np.uint32)
    labels[2:8, 2:8], labels[10:20, 10:20], labels[22:28, 30:36] = 1, 2, 3
    ch = np.arange(30 * 40, dtype=np.float32).reshape(30, 40)
    ch[labels == 3] = np.nan  # an object without a finite pixel
    ch[12, 12] = np.inf  # one bad pixel in object 2
    ch[0, 0] = np.nan  # background
    for block in (2048, 16):  # one block, and objects across block edges
        feats = measure_labels(labels, [ch], ["DAPI"], block=block)
        m = feats.set_index("label")["intensity_mean_DAPI"]
        assert m[1] == pytest.approx(ch[labels == 1].mean())
        assert m[2] == pytest.approx(ch[(labels == 2) & np.isfinite(ch)].mean())
        assert np.isnan(m[3]) and feats.attrs["n_nonfinite"] == {"DAPI": 38}
    table = feats.assign(plate="p", well="A1", row="A", column="1", field="0")
    s = {"status": "ok", **field_summary(table, ["DAPI"]), "n_nonfinite": feats.attrs["n_nonfinite"],
         "field_area_px": labels.size}
    fields = fields_table([{"plate": "p", "well": "A1", "row": "A", "column": "1", "field": "0", "path": "A/1/0",
                            "key": "k"}], {"k": s})
    assert fields["mean_intensity_DAPI"][0] == pytest.approx((m[1] + m[2]) / 2)  # not (m1 + m2 + 0) / 3
    assert fields["n_nonfinite_px"][0] == 38 and "NaN/inf" in fields["qc"][0]
    wells = wells_table(fields, pd.DataFrame(columns=["plate", "well", "area"]))
    assert wells["mean_intensity_DAPI"][0] == pytest.approx((m[1] + m[2]) / 2) and "NaN/inf" in wells["qc"][0]


# ---------------------------------------------------------------------------------------------- 6. metadata


def test_truncated_metadata_is_named(plate, tmp_path):
    cfg = validate_config(base_cfg(plate, tmp_path / "out"))
    good = (plate / "A/2/0/.zattrs").read_text()
    (plate / "A/2/0/.zattrs").write_text('{"multiscales": [')
    before = tree_hash(plate)
    plan = make_plan(cfg)
    err = field(plan, "A/2/0")["error"]
    assert str(plate / "A/2/0/.zattrs") in err and "truncated" in err
    assert "error" not in field(plan, "A/1/0")
    (plate / "A/2/0/.zattrs").write_text(good)
    (plate / "A/1/0/s1/.zarray").write_text('{"chunks": [1,')  # a level's array metadata
    assert str(plate / "A/1/0/s1/.zarray") in field(make_plan(cfg), "A/1/0")["error"]
    for broken in (plate / "A/2/.zattrs", plate / ".zattrs"):  # a well, the plate root: the plate stops, named
        broken.write_text(broken.read_text()[:20])
        with pytest.raises(InputError, match=re.escape(str(broken))):
            describe_store(plate)
    v5 = tmp_path / "v5.ome.zarr"
    write_synthetic_plate(v5, rows="A", columns=[1], fields=1, shape=(40, 40), nuclei=2, version="0.5")
    (v5 / "A/1/0/zarr.json").write_text('{"zarr_format": 3, "node')
    with pytest.raises(InputError, match=re.escape(str(v5 / "A/1/0/zarr.json"))):
        make_plan(validate_config({"input": str(v5), "output": str(tmp_path / "o5")}))
    assert_unchanged({k: v for k, v in before.items() if not k.endswith((".zattrs", ".zarray"))}, plate)


# ---------------------------------------------------------------------------------------------- 7. read-only


_PLAN = """
import sys
from pipeline_lib.config import validate_config
from pipeline_lib.steps.plan import write_plan
cfg = validate_config({"input": sys.argv[1], "output": sys.argv[2], "predictions": sys.argv[3],
                       "labels": {"store": sys.argv[4] if len(sys.argv) > 4 else None}})
write_plan(cfg, sys.argv[2] + "/plan.json")
"""


def test_read_only_input_without_label_store_is_refused_at_plan_time(plate, tmp_path):
    """On a plate whose files are read-only (as root: without the capability to override file permissions)."""
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root and no setpriv to drop CAP_DAC_OVERRIDE")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-fowner", "--inh-caps", "-dac_override,-fowner"]
    work = tmp_path / "ro"
    work.mkdir()
    try:
        ro = work / "plate.ome.zarr"
        shutil.copytree(plate, ro)
        shutil.copytree(plate.parent / "pred.ome.zarr", work / "pred.ome.zarr")
        for p in [ro, *ro.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        out = work / "out"
        before = tree_hash(ro)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        args = prefix + [sys.executable, "-c", _PLAN, str(ro), str(out), str(work / "pred.ome.zarr")]
        proc = subprocess.run(args, env=env, capture_output=True, text=True)
        assert proc.returncode != 0 and "Set labels.store to a writable path" in proc.stderr, proc.stderr[-2000:]
        assert str(ro) in proc.stderr and not (out / "plan.json").exists()
        assert tree_hash(ro) == before
        store = work / "labels.ome.zarr"
        proc = subprocess.run(args + [str(store)], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (out / "plan.json").exists() and (store / "A/1/0/labels/sam.lock").exists()
    finally:
        for p in [work, *work.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)


# ---------------------------------------------------------------------------------------------- 8. validate


def test_halo_larger_than_tile_and_validate_checks(tmp_path, plate):
    with pytest.raises(ConfigError, match=r"tiling.halo \(200\) is larger than tiling.tile \(64\)"):
        validate_config({"input": "x", "output": "y", "tiling": {"tile": 64, "halo": 200}})

    def validate(cfg: dict, *flags: str):
        path = tmp_path / "c.yaml"
        path.write_text(json.dumps(cfg))
        return subprocess.run([sys.executable, "-m", "pipeline_lib", "validate", str(path), *flags],
                              capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))

    p = validate({"input": str(plate), "output": "o", "model": {"name": "vit_zz"}})
    assert p.returncode == 1 and "unknown model 'vit_zz'" in p.stderr and "vit_b_lm" in p.stderr
    p = validate({"input": str(tmp_path / "nope.ome.zarr"), "output": "o"})
    assert p.returncode == 1 and "nope.ome.zarr' does not exist" in p.stderr
    p = validate({"input": str(tmp_path / "nope.ome.zarr"), "output": "o"}, "--schema-only")
    assert p.returncode == 0 and "schema only" in p.stdout
    p = validate({"input": str(plate), "output": "o", "tiling": {"tile": 64, "halo": 200}}, "--schema-only")
    assert p.returncode == 1 and "tiling.halo" in p.stderr
    p = validate({"input": str(plate), "output": "o", "tiling": {"tile": 64, "halo": 200}})
    assert p.returncode == 1 and "tiling.halo" in p.stderr
    p = validate({"input": str(plate), "output": "o"})
    assert p.returncode == 0 and "valid" in p.stdout
