"""The demo plate through README's cluster command (`snakemake --profile slurm ...`, from the repository
root) on a real single-node SLURM (tests/slurm/cluster.sh:
slurmctld, slurmd, slurmdbd + MariaDB, munge), with one GPU-rule job killed on purpose mid-run. The killed
job is retried by the profile, and the final labels equal those of an uninterrupted local run.

Needs root (the cluster runs as root and its Debian packages are installed when missing); skips otherwise.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from conftest import REPO, run_workflow

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
DAEMONS = ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd")
#: The cluster command as README.md gives it; the tests run exactly this, from the repository root.
README_COMMAND = "snakemake --profile slurm --configfile my.yaml"


def readme_command(config: Path) -> list[str]:
    """README's cluster command with ``my.yaml`` replaced by ``config`` (run it with cwd=REPO)."""
    assert README_COMMAND in (REPO / "README.md").read_text(), f"README no longer shows `{README_COMMAND}`"
    return [sys.executable, "-m"] + [str(config) if t == "my.yaml" else t for t in README_COMMAND.split()]


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("the test SLURM cluster runs as root")
    d = Path(tempfile.mkdtemp(prefix="samslurm", dir="/tmp"))  # short: the munge socket path must fit
    env = dict(os.environ, SLURM_TEST_DIR=str(d))
    if not all(shutil.which(x) or Path("/usr/sbin", x).exists() for x in DAEMONS):
        r = subprocess.run(["bash", str(CLUSTER), "install"], env=env, capture_output=True, text=True, timeout=900)
        if r.returncode:
            pytest.skip(f"could not install slurm-wlm/munge/slurmdbd/mariadb: {r.stderr[-500:]}")
    r = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"cluster start failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    env.update(SLURM_CONF=str(d / "etc" / "slurm.conf"), PATH=f"{d / 'bin'}:{env['PATH']}")
    yield env
    subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, timeout=300)
    shutil.rmtree(d, ignore_errors=True)


def test_profile_resources_evaluate_and_scale_with_attempt():
    """The shipped profile: GPU rules on the gpu partition, memory and runtime grow with the attempt."""
    prof = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert prof["executor"] == "slurm" and prof["retries"] >= 1 and prof["keep-going"] and prof["rerun-incomplete"]
    for rule in ("predict", "prompt_segment", "volume_segment"):
        assert prof["set-resources"][rule]["slurm_partition"] == "gpu"
    for rule, res in prof["set-resources"].items():
        for key in ("mem_mb", "runtime"):
            if key in res:
                assert eval(str(res[key]), {"attempt": 2}) == 2 * eval(str(res[key]), {"attempt": 1}), (rule, key)


def test_profile_mentions_every_cluster_rule():
    rules = set()
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        local = set(re.findall(r"\w+", " ".join(re.findall(r"^localrules:(.*)$", text, flags=re.M))))
        rules |= set(re.findall(r"^(?:rule|checkpoint) (\w+):", text, flags=re.M)) - local
    prof = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert rules - {"all"} <= set(prof["set-resources"]), rules - set(prof["set-resources"])


def _test_profile(dst: Path) -> Path:
    """An overlay for the test cluster, given after README's `--profile slurm`: its partition and size (1 CPU,
    small memory, no GPUs). A later profile replaces whole top-level keys, so the resource sections are the
    shipped ones with those values changed."""
    prof = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    overlay = {"default-resources": dict(prof["default-resources"], slurm_partition="debug", slurm_account="samtest",
                                         mem_mb="1500 * attempt", runtime="10 * attempt"),
               "set-resources": prof["set-resources"]}
    for res in overlay["set-resources"].values():
        res.update(slurm_partition="debug", mem_mb="1500 * attempt", cpus_per_task=1)
    for rule in ("predict", "prompt_segment", "volume_segment"):
        overlay["set-resources"][rule]["gpu"] = 0  # the test node has no GPU; the rules run on CPU
    overlay.update({"jobs": 4, "latency-wait": 5, "slurm-init-seconds-before-status-checks": 1,
                    "slurm-keep-successful-logs": True})
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.yaml").write_text(yaml.safe_dump(overlay))
    return dst


@pytest.mark.slow  # runs the plan step through Snakemake
def test_profile_by_name_plans_the_cluster_jobs_from_the_repository_root(tiny_model, tmp_path):
    """`snakemake --profile slurm` as typed (README), dry run after the plan: every batch gets its predict,
    segment and measure job, with the profile's partitions and resources (no sbatch needed)."""
    from pipeline_lib.io.synthetic import write_synthetic_plate
    write_synthetic_plate(tmp_path / "p.ome.zarr", rows="A", columns=[1, 2], fields=2, shape=(96, 128), nuclei=5)
    cfg = {"input": str(tmp_path / "p.ome.zarr"), "output": str(tmp_path / "out"), "method": "ais",
           "model": {"checkpoint": tiny_model["checkpoint"], "decoder": tiny_model["decoder"], "device": "cpu"},
           "batching": {"fields_per_job": 2}}
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(cfg))
    cmd = readme_command(tmp_path / "my.yaml")
    plan = subprocess.run(cmd[:3] + [str(tmp_path / "out" / "plan.json"), "--cores", "1"] + cmd[5:], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # the local plan step, no profile
    assert plan.returncode == 0, plan.stderr[-3000:]
    dry = subprocess.run(cmd + ["-n"], cwd=REPO, capture_output=True, text=True, timeout=300)
    out = dry.stdout + dry.stderr
    assert dry.returncode == 0, out[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out, flags=re.M))
    assert {k: counts.get(k) for k in ("predict", "segment", "measure")} == {"predict": "2", "segment": "2",
                                                                            "measure": "2"}, out[-3000:]
    jobs = re.findall(r"^rule (\w+):.*?resources: ([^\n]*)", out, flags=re.M | re.S)
    res = {rule: r for rule, r in jobs}
    assert "slurm_partition=gpu," in res["predict"] and "gpu=1" in res["predict"], res["predict"]
    assert "slurm_partition=cpu," in res["segment"] and "mem_mb=8000," in res["segment"], res["segment"]


def _is_sbatch(pid: int) -> bool:
    """The submission itself (its --wrap holds the job's command line; on a busy machine it runs for seconds)."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return True  # gone already
    return os.path.basename(argv0) == b"sbatch"


def _in_slurm_job(pid: int) -> bool:
    """The process runs inside a SLURM job (not, say, another test's local job of the same rule and batch)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return b"SLURM_JOB_ID=" in f.read()
    except OSError:
        return False


def _kill_when_running(pattern: str, proc: subprocess.Popen, timeout: float = 300) -> list[int]:
    """SIGKILL the processes of the job whose command line matches ``pattern`` once it has run 2 s."""
    t0, seen = time.time(), None
    while time.time() - t0 < timeout and proc.poll() is None:
        out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        pids = [int(p) for p in out if int(p) != os.getpid() and not _is_sbatch(int(p)) and _in_slurm_job(int(p))]
        if pids and seen is None:
            seen = time.time()
        if pids and time.time() - seen > 2:
            for p in pids:
                try:
                    os.kill(p, 9)
                except ProcessLookupError:
                    pass
            return pids
        time.sleep(0.3)
    return []


@pytest.mark.slow
def test_demo_plate_on_real_slurm_with_a_killed_job(slurm, tiny_model, tmp_path):
    from pipeline_lib.io.synthetic import write_synthetic_plate
    plates = {}
    for name in ("slurm", "local"):  # the demo plate (python -m pipeline_lib demo), twice
        plates[name] = tmp_path / name / "demo_plate.ome.zarr"
        write_synthetic_plate(plates[name], rows="AB", columns=[1, 2, 3], fields=2, shape=(384, 512), nuclei=40)
    model = {"checkpoint": tiny_model["checkpoint"], "decoder": tiny_model["decoder"], "device": "cpu"}
    base = {"method": "ais", "model": model, "ais": {"keep_unseeded": True}, "batching": {"fields_per_job": 4}}
    cfg = dict(base, input=str(plates["slurm"]), output=str(tmp_path / "slurm" / "results"))
    (tmp_path / "slurm" / "config.yaml").write_text(yaml.safe_dump(cfg))
    profile = _test_profile(tmp_path / "profile")
    cmd = readme_command(tmp_path / "slurm" / "config.yaml") + ["--profile", str(profile)]
    log = open(tmp_path / "snakemake.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=slurm, stdout=log, stderr=subprocess.STDOUT, text=True)
    killed = _kill_when_running(r"predict:batch=b0001", proc)
    try:
        rc = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (tmp_path / "snakemake.log").read_text()
    assert rc == 0, text[-6000:]
    assert killed, "the predict job of batch b0001 was never seen running"
    assert re.search(r"Error in rule predict|failed", text, flags=re.I), "the kill went unnoticed"
    states = subprocess.run(["sacct", "-X", "-n", "-P", "--format=JobID,State"], env=slurm, capture_output=True,
                            text=True).stdout
    assert "FAILED" in states or "CANCELLED" in states, states  # the killed attempt, as SLURM saw it
    assert states.count("COMPLETED") >= 9, states  # 3 batches x predict/segment/measure, plus the retry
    # an uninterrupted local run of the same config gives the same labels
    run_workflow(dict(base, input=str(plates["local"]), output=str(tmp_path / "local" / "results")),
                 tmp_path / "local")
    for f in yaml.safe_load((tmp_path / "slurm" / "results" / "summary.json").read_text())["fields"]:
        assert f["status"] in ("ok", "empty")
        a = zarr.open_array(f"{plates['slurm']}/{f['path']}/labels/sam/s0", mode="r")[:]
        b = zarr.open_array(f"{plates['local']}/{f['path']}/labels/sam/s0", mode="r")[:]
        assert np.array_equal(a, b), f["path"]
    # and a rerun has nothing left to do
    dry = subprocess.run(cmd + ["--dry-run"], cwd=REPO, env=slurm, capture_output=True, text=True, timeout=300)
    assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-2000:]
