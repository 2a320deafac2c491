"""Locks that keep two runs from writing the same label images, and atomic metadata list updates.

A run is its output directory: a lock file ``labels/<name>.lock`` next to each label image it writes names
it (output, host, pid of its Snakemake process, start time). Another output dir is refused while that run
may be alive; a lock whose Snakemake process on this host is gone is stale and taken over. Locks are
created at plan time (before any GPU work), checked again by each job before it writes, and removed when
the run completes. POSIX-only (``fcntl``; the workflow targets Linux and SLURM).
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from typing import Any, Callable, Iterator, Sequence

from .ome_zarr import InputError


class LockedError(InputError):
    """Another run holds the lock of a label image; the message names that run and how to clear it."""


def _proc_start(pid: int) -> str | None:
    """Start time of process ``pid`` (clock ticks since boot, /proc) to tell a reused pid apart; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def run_process() -> int:
    """The pid that stands for this run: the outermost Snakemake ancestor (job scripts are its children and
    end with each job), else this process."""
    pid, best = os.getpid(), os.getpid()
    while pid > 1:
        if "snakemake" in _cmdline(pid):
            best = pid
        pid = _parent(pid)
    return best


def run_id(output: str) -> dict[str, Any]:
    pid = run_process()
    return {"output": os.path.abspath(output), "host": socket.gethostname(), "pid": pid,
            "pid_start": _proc_start(pid), "time": datetime.datetime.now().isoformat(timespec="seconds")}


def read_lock(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:  # half-written by a killed run: nobody can own it
        return {"output": None}


def is_stale(owner: dict[str, Any]) -> bool:
    """The owning run is certainly gone: its Snakemake process on this host no longer exists."""
    if owner.get("output") is None:
        return True
    if owner.get("host") != socket.gethostname():
        return False  # cannot tell from here
    start = _proc_start(int(owner.get("pid", 0)))
    return start is None or (owner.get("pid_start") is not None and start != owner["pid_start"])


def _write_new(path: str, me: dict[str, Any]) -> bool:
    """Create the lock with O_EXCL; False when it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    return True


def _refusal(path: str, owner: dict[str, Any], what: str) -> LockedError:
    return LockedError(
        f"{what} is being written by another run: output '{owner.get('output')}' (host {owner.get('host')}, pid "
        f"{owner.get('pid')}, since {owner.get('time')}); lock file {path}. Two runs must not write the same label "
        "image: wait for that run to finish, or give this run another labels.name or labels.store. If that run is "
        f"no longer running (e.g. on another host), delete its lock files: find <labels location> -name "
        f"'{os.path.basename(path)}' -delete")


def acquire(path: str, me: dict[str, Any], what: str) -> bool:
    """Take the lock at ``path`` for run ``me`` (idempotent for the same output dir); True when this call
    created or took it over. Raises LockedError when another live run holds it."""
    for _ in range(3):
        if _write_new(path, me):
            return True
        owner = read_lock(path)
        if owner is None:
            continue  # released meanwhile
        if owner.get("output") == me["output"]:
            return False
        if not is_stale(owner):
            raise _refusal(path, owner, what)
        print(f"taking over the stale lock {path} of run '{owner.get('output')}' (its process is gone)",
              file=sys.stderr)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    raise _refusal(path, read_lock(path) or {}, what)


def acquire_all(items: Sequence[tuple[str, str]], me: dict[str, Any]) -> None:
    """Lock every ``(lock path, description)``; on refusal release the ones this call took and re-raise."""
    taken = []
    try:
        for path, what in items:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if acquire(path, me, what):
                taken.append(path)
    except BaseException:
        release_all([p for p in taken], me)
        raise


def release_all(paths: Sequence[str], me: dict[str, Any]) -> int:
    """Remove the locks at ``paths`` held by ``me``'s output dir; returns how many."""
    n = 0
    for path in paths:
        owner = read_lock(path)
        if owner is not None and owner.get("output") == me["output"]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
                n += 1
    return n


@contextlib.contextmanager
def exclusive(path: str) -> Iterator[None]:
    """An fcntl (flock) lock on ``path`` (created if missing) for the duration of the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def locked_update(directory: str, update: Callable[[], Any]) -> Any:
    """Run ``update`` (a read-modify-write of the metadata in ``directory``) under an exclusive lock, so
    that concurrent jobs do not lose each other's entries (e.g. the ``labels`` list of ``labels/``)."""
    os.makedirs(directory, exist_ok=True)
    with exclusive(os.path.join(directory, ".metadata.lock")):
        return update()
