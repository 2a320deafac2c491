"""The one per-unit loop of the batch steps: run each unit (a field, a block), record ok / empty / failed.

A unit that raises one of the expected errors (bad input, I/O, a missing key) is recorded as failed with
a one-line error and logged as one line; the other units go on. The traceback goes to the job log only
with ``PIPELINE_DEBUG=1`` (a failed field is a data problem, not a crash; the line names the file).
Anything else (a bug, out of memory) propagates and fails the job, which Snakemake then retries.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Callable, Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")

#: Errors that fail one unit, not the job (InputError is a ValueError).
UNIT_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError)


def debug() -> bool:
    return os.environ.get("PIPELINE_DEBUG", "") not in ("", "0")


def failed(error: str, **extra: Any) -> dict[str, Any]:
    """The status of a failed unit."""
    return {"status": "failed", **extra, "error": error}


def describe(e: BaseException) -> str:
    """``Type: message`` on one line (InputError messages already name the file and the fix)."""
    msg = " ".join(str(e).split())
    return msg if type(e).__name__ == "InputError" else f"{type(e).__name__}: {msg}"


def log_failure(desc: str, key: str, error: str) -> None:
    tqdm.write(f"{desc}: {key} failed: {error}", file=sys.stderr)


def run_units(units: Iterable[tuple[str, T]], work: Callable[[T], dict[str, Any]], desc: str, unit: str = "field",
              on_error: Callable[[T, str], dict[str, Any]] | None = None,
              total: int | None = None) -> dict[str, dict[str, Any]]:
    """``{key: status}`` for every ``(key, item)``: ``work(item)`` returns the status dict (``status`` is ok,
    empty or failed); an expected error becomes ``on_error(item, error)`` (default ``failed(error)``).
    Each failed unit, whether raised or returned as failed, gets one log line."""
    units = list(units)
    status: dict[str, dict[str, Any]] = {}
    for key, item in tqdm(units, total=total or len(units), desc=desc, unit=unit, file=sys.stderr):
        try:
            s = work(item)
        except UNIT_ERRORS as e:
            if debug():
                traceback.print_exc()
            err = describe(e)
            s = on_error(item, err) if on_error else failed(err)
        if s.get("status") == "failed":
            log_failure(desc, key, s.get("error", "no error given"))
        status[key] = s
    return status
