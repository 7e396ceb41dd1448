"""Study runs as jobs: picklable, deduplicated, run serially or in worker processes.

A :class:`Job` names a function (``"module:function"``) and its keyword arguments; its key
is derived from both, so two experiments asking for the same run share one result. A job
function is called as ``fn(dataset, **kwargs)`` and returns a JSON-ready dict. Each job
seeds everything it draws from its own arguments, so results do not depend on which process
runs it or in what order.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass

from ..errors import SharingError

__all__ = ["Job", "job", "run_jobs", "StudyError"]


class StudyError(SharingError):
    """The study cannot run as asked (an output folder in the way, a failed run)."""


@dataclass(frozen=True)
class Job:
    """One run: ``fn(dataset, **kwargs)``; ``cost`` weighs it for the progress bar and scheduling."""

    key: str
    fn: str
    kwargs_json: str
    cost: float
    label: str = ""

    @property
    def kwargs(self) -> dict:
        return json.loads(self.kwargs_json)


def job(fn: str, cost: float, label: str = "", **kwargs) -> Job:
    """A :class:`Job` calling ``fn`` (``"module:function"``) with JSON-ready ``kwargs``."""
    kw = json.dumps(kwargs, sort_keys=True)
    return Job(key=f"{fn.rsplit(':', 1)[-1]}{kw}", fn=fn, kwargs_json=kw, cost=float(cost), label=label)


def _resolve(fn: str) -> Callable:
    module, name = fn.split(":")
    return getattr(importlib.import_module(module), name)


def call(j: Job, data) -> dict:
    return _resolve(j.fn)(data, **j.kwargs)


# ---- worker processes -----------------------------------------------------------------------
_DATA = None


def _init_worker(data) -> None:
    global _DATA
    import torch

    torch.set_num_threads(1)
    _DATA = data


def _run_in_worker(j: Job) -> dict:
    return call(j, _DATA)


def run_jobs(jobs: Iterable[Job], data, workers: int = 1, on_done: Callable[[Job], None] | None = None,
             on_start: Callable[[Job], None] | None = None) -> dict[str, dict]:
    """Run each distinct job once; returns ``{key: result}``.

    ``workers > 1`` runs jobs in that many spawned processes (one thread each), costliest first.

    Raises:
        StudyError: a job failed (its key and the error are named).
    """
    unique: dict[str, Job] = {}
    for j in jobs:
        unique.setdefault(j.key, j)
    order = sorted(unique.values(), key=lambda j: -j.cost)
    results: dict[str, dict] = {}
    if workers <= 1 or len(order) <= 1:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for j in order:
                if on_start:
                    on_start(j)
                results[j.key] = _checked(j, lambda: call(j, data))
                if on_done:
                    on_done(j)
        finally:
            torch.set_num_threads(threads)
        return results
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(data,))
    try:
        pending = {pool.submit(_run_in_worker, j): j for j in order}
        if on_start:
            for j in order[:workers]:
                on_start(j)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                j = pending.pop(fut)
                results[j.key] = _checked(j, fut.result)
                if on_done:
                    on_done(j)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        for p in list(getattr(pool, "_processes", {}).values()):
            p.terminate()
        raise
    pool.shutdown(wait=True)
    return results


def _checked(j: Job, get: Callable[[], dict]) -> dict:
    try:
        return get()
    except (KeyboardInterrupt, StudyError):
        raise
    except Exception as e:
        raise StudyError(f"study run {j.label or j.key} failed: {type(e).__name__}: {e}") from e


def default_workers() -> int:
    """Worker processes to use by default: the CPUs this process may use, at most 2."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(2, n))
