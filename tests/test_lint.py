"""Static checks that CI runs through `make test`: `ruff check` on the Python code (rules in pyproject.toml) and
`snakemake --lint` on the workflow, for each set of rule files a config can include (plate APG, plate AIS,
ingest, volume)."""
import importlib.util
import subprocess
import sys

import pytest
import yaml

from conftest import REPO


def test_ruff_check_is_clean():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (it is in the test extra: pip install -e '.[test]')")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def lint_inputs(tmp_path_factory):
    from pipeline_lib.io.synthetic import write_synthetic_plate
    from pipeline_lib.io.synthetic_volume import write_synthetic_volume
    d = tmp_path_factory.mktemp("lint")
    write_synthetic_plate(d / "plate.ome.zarr", rows="A", columns=[1], fields=1, shape=(32, 32), nuclei=1)
    write_synthetic_volume(d / "volume.ome.zarr", shape=(4, 32, 32))
    return d


@pytest.mark.parametrize("kind", ["apg", "ais", "ingest", "volume"])
def test_snakemake_lint_is_clean(lint_inputs, kind):
    d = lint_inputs
    cfg = {"input": str(d / ("volume.ome.zarr" if kind == "volume" else "plate.ome.zarr")), "output": str(d / kind)}
    if kind == "ais":
        cfg["method"] = "ais"
    if kind == "ingest":
        cfg.update(input=str(d / "ingested.ome.zarr"), ingest={"source": str(d)})
    (d / f"{kind}.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--snakefile", str(REPO / "Snakefile"),
                           "--configfile", str(d / f"{kind}.yaml")], cwd=d, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Lints for" not in out, out[-4000:]
