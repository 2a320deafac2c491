import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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


def independent_scores(pred, true) -> dict:
    """mSA, SA50 and error rate with no code shared with the pipeline: a sparse contingency table, the dense
    IoU matrix, and a maximum one-to-one matching (Hungarian) of the pairs above each threshold."""
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    pred, true = np.asarray(pred).ravel(), np.asarray(true).ravel()
    p_ids, p_inv = np.unique(pred, return_inverse=True)
    t_ids, t_inv = np.unique(true, return_inverse=True)
    inter = coo_matrix((np.ones(pred.size), (p_inv, t_inv)), shape=(len(p_ids), len(t_ids))).toarray()
    inter = inter[p_ids > 0][:, t_ids > 0]
    size_p = np.bincount(p_inv)[p_ids > 0]
    size_t = np.bincount(t_inv)[t_ids > 0]
    iou = inter / (size_p[:, None] + size_t[None, :] - inter)
    n_p, n_t = len(size_p), len(size_t)
    sa, tp50 = [], 0
    for k, t in enumerate(np.arange(0.5, 1.0, 0.05)):
        hit = (iou >= t - 1e-12).astype(float)
        r, c = linear_sum_assignment(-hit) if hit.size else ([], [])
        tp = hit[r, c].sum() if hit.size else 0
        tp50 = tp if k == 0 else tp50
        sa.append(tp / (n_p + n_t - tp) if n_p + n_t - tp else 1.0)
    return {"msa": float(np.mean(sa)), "sa50": float(sa[0]),
            "error_rate": float((n_p + n_t - 2 * tp50) / n_t) if n_t else float(n_p > 0)}


# ---------------------------------------------------------------------- headless browser (report tests)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if exe := shutil.which(name):
            return exe
    pytest.skip("no Chromium found for the screenshot test: apt-get install chromium")


def screenshot(html: Path, png: Path, height: int = 4200) -> float:
    """Screenshot ``html`` with headless Chromium; returns the seconds it took."""
    t0 = time.perf_counter()
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--disable-dev-shm-usage", "--force-device-scale-factor=1", f"--user-data-dir={png.parent / 'profile'}",
           f"--screenshot={png}", f"--window-size=1400,{height}", html.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert png.is_file(), f"no screenshot ({proc.returncode}): {proc.stderr[-2000:]}"
    return time.perf_counter() - t0


def viridis_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels within a few levels of a viridis colour and clearly coloured (not grey)."""
    from matplotlib import colormaps
    lut = (colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.float32)
    packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    keys, inverse = np.unique(packed.ravel(), return_inverse=True)
    c = np.stack([keys >> 16, (keys >> 8) & 255, keys & 255], axis=1).astype(np.float32)
    near = np.sqrt(((c[:, None, :] - lut[None]) ** 2).sum(-1)).min(1) < 12
    chroma = c.max(1) - c.min(1) > 40
    return (near & chroma)[inverse.ravel()].reshape(rgb.shape[:2])


def outline_mask(rgb: np.ndarray) -> np.ndarray:
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return (r > 200) & (g < 60) & (b > 200)
