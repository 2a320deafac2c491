"""The ``log:`` file of a Snakemake ``run:`` step.

The snakemake-workflows catalog sends the stderr of its Python scripts to the rule's log with
``sys.stderr = open(snakemake.log[0], "w")``. A ``run:`` block shares its process with Snakemake's job runner,
so here the redirect is scoped to the step: progress bars, warnings and the traceback of a failure go to the
log, and stderr is restored afterwards (Snakemake then reports the failure and names the log).
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Any, Callable, Iterator, Sequence


@contextlib.contextmanager
def step_log(path: str | os.PathLike) -> Iterator[None]:
    """Redirect ``sys.stderr`` into ``path`` (truncated) for the duration of the block."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", buffering=1) as f, contextlib.redirect_stderr(f):
        try:
            yield
        except BaseException:
            traceback.print_exc(file=f)
            raise
        finally:
            sys.stderr.flush()


def logged(log: Sequence[str] | str, step: Callable[[], Any]) -> Any:
    """``step()`` with its stderr in the rule's log file: ``logged(log, lambda: run_x(...))`` in a ``run:``
    block (the lambda keeps the run block short, as ``snakemake --lint`` wants, and evaluates the arguments,
    e.g. a model download, inside the log's scope)."""
    with step_log(log if isinstance(log, (str, os.PathLike)) else log[0]):
        return step()
