import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
PLATE = SHARED / "bbbc039_plate_rowsAB.ome.zarr"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def real_plate():
    if not PLATE.exists():
        pytest.skip(f"{PLATE} not present")
    return PLATE


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from pipeline_lib.models.tiny import write_tiny_model
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def run_workflow(cfg: dict, workdir: Path, extra: tuple = (), check: bool = True) -> subprocess.CompletedProcess:
    """Run the real Snakefile on ``cfg`` (written to workdir/config.yaml) with 2 cores."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(cfg_path), "--cores", "2", "--quiet", "rules", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def subset_plate(src: Path, dst: Path, wells: list[str]) -> Path:
    """A writable copy of an NGFF 0.4 plate keeping only ``wells`` (e.g. ["A/2", "B/4"])."""
    import json
    import shutil
    shutil.copytree(src, dst, ignore=lambda d, names: [
        n for n in names if Path(d).parent == Path(src) and f"{Path(d).name}/{n}" not in wells
        and (Path(d) / n).is_dir()])
    attrs = json.loads((dst / ".zattrs").read_text())
    attrs["plate"]["wells"] = [w for w in attrs["plate"]["wells"] if w["path"] in wells]
    (dst / ".zattrs").write_text(json.dumps(attrs))
    return dst
