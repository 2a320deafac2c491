"""Smoke test of bench/gpu.py in its CPU setting, made smaller still (256 x 256 input, 2 encoder blocks,
1 field, tiny model): every section prints its table without an error row."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_gpu_cpu_small_smoke(real_plate, tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "gpu.py"), "--device", "cpu", "--small", "--img-size", "256",
           "--depth", "2", "--precisions", "fp32", "--fields", "1", "--budget-s", "400",
           "--encoder-share", "0.2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    enc = [ln for ln in out.splitlines() if ln.startswith("| vit_b | fp32 | 1 |")]
    assert len(enc) == 1 and "error" not in enc[0], out
    for method in ("apg", "ais"):
        row = [ln for ln in out.splitlines() if ln.startswith(f"| {method} |")]
        assert len(row) == 1 and "| 1/1 |" in row[0] and "% of" in row[0], out
