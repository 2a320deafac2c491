"""`python -m pipeline_lib demo` without internet: the whole workflow runs on oracle decoder maps computed from
the demo plate's ground truth, and says so (console, provenance.json, report header)."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import zarr

from conftest import REPO
from pipeline_lib.measure.summaries import read_csv

#: A proxy nobody listens on: every download fails at once, as offline (the cache is empty).
OFFLINE = "http://127.0.0.1:9"


@pytest.mark.slow
def test_offline_demo_runs_the_workflow_on_oracle_maps(tmp_path):
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    env.update(HTTPS_PROXY=OFFLINE, https_proxy=OFFLINE, HTTP_PROXY=OFFLINE, http_proxy=OFFLINE,
               MICROSAM_CACHEDIR=str(tmp_path / "cache"))
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "pipeline_lib", "demo", "--out", str(out), "--rows", "A",
                           "--columns", "1,2", "--fields", "1"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    assert "vit_b_lm could not be downloaded" in console and "ORACLE decoder maps" in console, console[:2000]
    res = out / "results"
    for name in ("objects.parquet", "fields.csv", "metrics.csv", "report.html", "provenance.json"):
        assert (res / name).is_file(), name
    for well in ("A/1/0", "A/2/0"):
        labels = zarr.open_array(str(out / "demo_plate.ome.zarr" / well / "labels" / "sam" / "s0"), mode="r")[:]
        assert labels.max() > 0, well
    objects = pd.read_parquet(res / "objects.parquet")
    assert len(objects) > 0 and set(objects["well"]) == {"A1", "A2"}
    keys = ["plate", "well", "row", "column", "field"]
    assert len(objects.merge(read_csv(str(res / "fields.csv"))[keys], on=keys)) == len(objects)  # string keys
    metrics = pd.read_csv(res / "metrics.csv")
    field_msa = metrics.loc[metrics["level"] == "field", "msa"].to_numpy()
    assert len(field_msa) == 2 and np.all(field_msa >= 0.9)  # oracle maps give back the ground truth
    prov = json.loads((res / "provenance.json").read_text())
    assert prov["model"]["predictions_source"]["kind"] == "oracle" and prov["config"]["ground_truth"] == "nuclei_gt"
    assert "segment b0000" in (res / "logs" / "segment" / "b0000.log").read_text()  # the step's progress bar
    assert (res / "benchmarks" / "measure" / "b0000.tsv").is_file() and (res / "logs" / "report.log").is_file()
    report = (res / "report.html").read_text()
    assert "(oracle maps)" in report and "ORACLE decoder maps" in report


def test_unreachable_answers_within_its_timeout():
    """The demo's probe: a server that answers (even 501 to HEAD), a refused port, and one that never answers."""
    import http.server
    import socket
    import threading

    from pipeline_lib.models.download import unreachable

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # 501 to every method
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts the connection, never sends a byte
    try:
        assert unreachable(f"http://127.0.0.1:{server.server_port}/vit_b.pt", timeout=5) is None
        assert "refused" in unreachable(OFFLINE + "/vit_b.pt", timeout=5).lower()
        why = unreachable(f"http://127.0.0.1:{silent.getsockname()[1]}/vit_b.pt", timeout=1)
        assert why and ("timed out" in why or "no answer" in why), why
    finally:
        server.shutdown()
        silent.close()


def test_logged_step_writes_its_stderr_and_traceback_to_the_log_then_restores_stderr(tmp_path):
    from pipeline_lib.steps.logs import logged

    def failing():
        print("progress 50%", file=sys.stderr)
        raise ValueError("corrupt chunk in A/1/0")

    before = sys.stderr
    with pytest.raises(ValueError, match="corrupt chunk"):
        logged([str(tmp_path / "logs" / "x.log")], failing)
    assert sys.stderr is before
    text = (tmp_path / "logs" / "x.log").read_text()
    assert "progress 50%" in text and "Traceback" in text and "corrupt chunk in A/1/0" in text
    assert logged(str(tmp_path / "y.log"), lambda: 7) == 7
