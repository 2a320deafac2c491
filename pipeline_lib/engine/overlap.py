"""A small bounded producer/consumer pipeline, so that the device never waits for the CPU work of a job.

A job's fields (or tile batches) flow through a chain of stages, each in its own thread, joined by queues
of ``depth`` items: while the device encodes field i, a reader thread reads and preprocesses field i+1 and
a writer thread paints, writes and builds the pyramids of field i-1. Memory stays bounded: at most
``depth`` items wait between two stages, plus one in each stage.

An exception raised by a stage for one item is carried with that item to the end (later stages skip it),
so the caller reports that field as failed and the others finish; the order of the results is the order
of the items. ``threaded=False`` runs the same stage functions one item after the other (the sequential
path the tests compare against).

``DeviceClock`` measures the device-busy fraction: CUDA events around the device calls on a GPU (their
union on the GPU timeline, so overlapping calls from two threads count once), the same intervals from
``time.perf_counter`` on CPU.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

_END = object()


@dataclass
class Outcome:
    """One item after the last stage: its value, or the exception of the stage that failed (``stage``)."""

    index: int
    item: Any
    value: Any = None
    error: BaseException | None = None
    stage: str | None = None


class StageTimes:
    """Seconds spent in each stage (summed over items; thread-safe)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextlib.contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)


def _union_seconds(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


class DeviceClock:
    """Busy time of the device: wrap each device call in ``with clock.busy():``."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._lock = threading.Lock()
        self._intervals: list = []
        self._t0 = time.perf_counter()
        if self.cuda:
            self._ref = torch.cuda.Event(enable_timing=True)
            self._ref.record(torch.cuda.current_stream(self.device))

    @contextlib.contextmanager
    def busy(self):
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            try:
                yield
            finally:
                end.record(stream)
                with self._lock:
                    self._intervals.append((start, end))
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self._intervals.append((t0, time.perf_counter()))

    def busy_seconds(self) -> float:
        """Seconds in which at least one device call was running."""
        with self._lock:
            intervals = list(self._intervals)
        if self.cuda:
            torch.cuda.synchronize(self.device)
            intervals = [(self._ref.elapsed_time(a) / 1e3, self._ref.elapsed_time(b) / 1e3) for a, b in intervals]
        return _union_seconds(intervals)

    def report(self, times: StageTimes | None = None) -> dict[str, Any]:
        """The job's timing record: wall, device-busy seconds and fraction, seconds per stage."""
        wall = time.perf_counter() - self._t0
        busy = self.busy_seconds()
        out = {"wall_s": round(wall, 3), "device": str(self.device), "device_busy_s": round(busy, 3),
               "device_busy_fraction": round(busy / wall, 3) if wall > 0 else None,
               "clock": "cuda events" if self.cuda else "perf_counter"}
        if times is not None:
            out["stages_s"] = {k: round(v, 3) for k, v in times.seconds.items()}
        return out


def timing_line(label: str, record: dict[str, Any]) -> str:
    """One log line from ``DeviceClock.report``."""
    stages = ", ".join(f"{k} {v:.2f}" for k, v in record.get("stages_s", {}).items())
    frac = record["device_busy_fraction"]
    return (f"{label}: wall {record['wall_s']:.2f} s, device busy {record['device_busy_s']:.2f} s "
            f"({'-' if frac is None else f'{100 * frac:.0f} %'}); stages (s): {stages}")


Stage = tuple[str, Callable[[Any], Any]]


def _apply(stage: Stage, out: Outcome, times: StageTimes | None) -> Outcome:
    if out.error is not None:
        return out
    name, fn = stage
    t0 = time.perf_counter()
    try:
        with torch.no_grad():  # grad mode is per thread
            out.value = fn(out.value)
    except Exception as e:  # noqa: BLE001 - carried to the caller with the item
        out.value, out.error, out.stage = None, e, name
    finally:
        if times is not None:
            times.add(name, time.perf_counter() - t0)
    return out


def run_pipeline(items: Iterable[Any], stages: Sequence[Stage], depth: int = 1, threaded: bool = True,
                 times: StageTimes | None = None, max_in_flight: int | None = None) -> Iterator[Outcome]:
    """Outcomes of ``stages`` applied in turn to each item (the first stage gets the item), in item order.

    With ``threaded`` each stage runs in its own thread, at most ``depth`` items queued between stages and
    at most ``max_in_flight`` items started and not yet handed to the caller (memory bound for big fields).
    Closing the generator early (or an exception in the consumer) stops the threads.
    """
    if not threaded:
        for i, item in enumerate(items):
            out = Outcome(i, item, item)
            for st in stages:
                out = _apply(st, out, times)
            yield out
        return
    stop = threading.Event()
    tokens = threading.Semaphore(max_in_flight) if max_in_flight else None
    queues = [queue.Queue(maxsize=max(1, depth)) for _ in range(len(stages) + 1)]

    def put(q: queue.Queue, x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def feed():
        try:
            for i, item in enumerate(items):
                while tokens is not None and not tokens.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if not put(queues[0], Outcome(i, item, item)):
                    return
        except Exception as e:  # noqa: BLE001 - the item source itself failed: reported as a last outcome
            put(queues[0], Outcome(-1, None, None, e, "source"))
        put(queues[0], _END)

    def work(k: int):
        while not stop.is_set():
            try:
                x = queues[k].get(timeout=0.1)
            except queue.Empty:
                continue
            if x is _END:
                put(queues[k + 1], _END)
                return
            if not put(queues[k + 1], _apply(stages[k], x, times)):
                return

    threads = [threading.Thread(target=feed, name="pipeline-feed", daemon=True)]
    threads += [threading.Thread(target=work, args=(k,), name=f"pipeline-{stages[k][0]}", daemon=True)
                for k in range(len(stages))]
    for t in threads:
        t.start()
    try:
        while True:
            try:
                x = queues[-1].get(timeout=0.1)
            except queue.Empty:
                if not any(t.is_alive() for t in threads) and queues[-1].empty():
                    raise RuntimeError("pipeline threads ended without delivering all items") from None
                continue
            if x is _END:
                return
            yield x
            if tokens is not None:
                tokens.release()
    finally:
        stop.set()
        for t in threads:
            t.join()


def run_staged_units(units: Sequence[tuple[str, Any]], start: Callable[[Any], Any], stages: Sequence[Stage],
                     finish: Callable[[Any, Any], dict[str, Any]], desc: str, unit: str = "field",
                     on_error: Callable[[Any, str], dict[str, Any]] | None = None, threaded: bool = True,
                     times: StageTimes | None = None, max_in_flight: int | None = None) -> dict[str, dict[str, Any]]:
    """``engine.runner.run_units`` for work split into ``stages`` that overlap across units: ``{key: status}``
    for every ``(key, item)``. The first stage gets ``start(item)``; ``finish(item, value)`` (its own last
    stage, e.g. the writes) returns the unit's status. The status protocol is run_units': an expected error
    (``runner.UNIT_ERRORS``) in any stage becomes ``on_error(item, error)`` (default ``failed(error)``) and
    one log line, anything else fails the job. ``seconds`` of a unit: the sum of its stages' times."""
    import sys
    import traceback

    from tqdm import tqdm

    from .runner import UNIT_ERRORS, debug, describe, failed, log_failure

    units = list(units)

    def timed(name: str, fn: Callable) -> Stage:
        def run(box: dict) -> dict:
            t0 = time.perf_counter()
            box["value"] = fn(box["value"])
            box["seconds"] += time.perf_counter() - t0
            return box
        return name, run

    def last(box: dict) -> dict:
        t0 = time.perf_counter()
        s = finish(box["item"], box["value"])
        return {**s, "seconds": round(box["seconds"] + time.perf_counter() - t0, 3)}

    chain = [timed(n, f) for n, f in stages] + [("write", last)]
    boxes = ({"item": item, "value": start(item), "seconds": 0.0} for _, item in units)
    status: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(units), desc=desc, unit=unit, file=sys.stderr)
    with bar, contextlib.closing(run_pipeline(boxes, chain, depth=1, threaded=threaded, times=times,
                                              max_in_flight=max_in_flight)) as outs:
        for out in outs:
            if out.error is not None and (out.index < 0 or not isinstance(out.error, UNIT_ERRORS)):
                raise out.error  # a bug, out of memory, or the unit list itself failed
            key, item = units[out.index]
            if out.error is not None:
                if debug():
                    traceback.print_exception(out.error)
                err = describe(out.error)
                s = on_error(item, err) if on_error else failed(err)
            else:
                s = out.value
            if s.get("status") == "failed":
                log_failure(desc, key, s.get("error", "no error given"))
            status[key] = s
            bar.update(1)
    return status
