"""What produced a run: config, model files and hashes, method and its parameters, package versions."""
from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ["pipeline_lib", "torch", "torchvision", "segment-anything", "micro-sam", "torch-em", "bioimage-cpp",
            "snakemake", "snakemake-executor-plugin-slurm", "zarr", "ome-zarr", "numpy", "scipy", "scikit-image",
            "pandas", "pyarrow", "anndata", "bioio", "dask"]


def package_versions(names: list[str] = PACKAGES) -> dict[str, str]:
    """Installed versions (without importing the packages); absent ones are left out."""
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


def workflow_commit() -> str | None:
    """The git commit of this workflow's checkout, with '+dirty' for uncommitted changes."""
    repo = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def method_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config sections that decide the objects of the chosen method, and the thresholds in effect."""
    import dataclasses

    from .methods import get_method
    spec = get_method(cfg)
    resolved = spec.resolved_params(cfg)
    return {**{k: cfg[k] for k in [*spec.sections, "tiling", "channel"]}, "resolved": dataclasses.asdict(resolved)}


def provenance(cfg: dict[str, Any], model_info: dict[str, Any], configfiles: list[str] | None = None
               ) -> dict[str, Any]:
    """``configfiles``: the config files the run was started with (Snakemake's ``workflow.configfiles``)."""
    return {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(), "configfiles": [os.path.abspath(p) for p in configfiles or []],
            "workflow_commit": workflow_commit(),
            "method": cfg["method"], "model": model_info, "params": method_params(cfg),
            "versions": package_versions(), "config": cfg}
