"""The helper threads the CPU kernels share: a kernel call's compiled (``nogil``) function runs on
the calling thread and on helpers side by side, over parts the threads claim as they come.

The calling thread never waits for a helper to start: it takes the first part at once and then
any part no helper has claimed yet, so a helper woken late (a sleeping thread takes tens of
microseconds to run again here, where a batch-1 search lasts ~0.5 ms) costs nothing and a kernel
call with one thread's work stays on the calling thread. It waits only for the helpers that did
start, spinning with the GIL released, so that a helper returning from its compiled function takes
the GIL and gives it back while the caller does not need it (a ``ThreadPoolExecutor``'s future
made the caller sleep on a lock and be woken, and handed the GIL to and fro, each time).
"""

from __future__ import annotations

import atexit
import itertools
import os
import threading
import time
from collections.abc import Callable
from queue import SimpleQueue

import numba
import numpy as np
import torch

from sterling.ops.cpu.atomics import fetch_add, load

__all__ = ["finish_parts", "run_chunked", "run_parts", "start_parts"]

_STARTED, _FINISHED = 0, 1
_SPINS = 1 << 18  # polls (atomic reads) before the caller naps between polls: a short wait
_NAP_S = 5e-5
_CORES = os.cpu_count() or 1


class _Job:
    """One kernel call's parts, claimed in order by the caller and the helpers."""

    __slots__ = ("fn", "parts", "slots", "state", "errors")

    def __init__(self, fn: Callable[..., None], parts: list[tuple]) -> None:
        self.fn, self.parts = fn, parts
        self.slots = itertools.count()  # next() is atomic under the GIL
        self.state = np.zeros(2, dtype=np.int64)  # helpers that started the job, that finished it
        self.errors: list[BaseException] = []

    def work(self) -> None:
        for i in self.slots:
            if i >= len(self.parts):
                return
            self.fn(*self.parts[i])


class _Helpers:
    """Daemon threads serving one queue of jobs (a forked child starts with none), stopped and
    joined at exit: a daemon thread still in a kernel when the interpreter finalizes is killed
    mid-call, which aborts the process (C++ frames of numba's dispatcher on its stack)."""

    def __init__(self) -> None:
        self.jobs: SimpleQueue[_Job | None] = SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    def post(self, job: _Job, helpers: int) -> None:
        with self.lock:
            while len(self.threads) < helpers:
                thread = threading.Thread(target=self._serve, daemon=True, name=f"sterling-cpu-op-{len(self.threads)}")
                thread.start()
                self.threads.append(thread)
        for _ in range(helpers):
            self.jobs.put(job)

    def stop(self) -> None:
        with self.lock:
            for _ in self.threads:
                self.jobs.put(None)
            for thread in self.threads:
                thread.join()
            self.threads.clear()

    def _serve(self) -> None:
        while (job := self.jobs.get()) is not None:
            _count(job.state, _STARTED)
            try:
                job.work()
            except BaseException as error:  # raised on the calling thread
                job.errors.append(error)
            _count(job.state, _FINISHED)


_HELPERS = _Helpers()
atexit.register(lambda: _HELPERS.stop())
os.register_at_fork(after_in_child=lambda: globals().update(_HELPERS=_Helpers()))


@numba.njit(cache=True)
def _count(state, i):
    """``state[i] += 1``, atomically (two helpers may count at once)."""
    fetch_add(state, i, 1)


@numba.njit(nogil=True, cache=True)
def _finished(state, spins):
    """Whether every helper that started a job has finished it, polled up to ``spins`` times."""
    for _ in range(spins):
        if load(state, _FINISHED) >= load(state, _STARTED):
            return True
    return False


def start_parts(fn: Callable[..., None], parts: list[tuple]) -> _Job:
    """Posts ``fn(*args)`` for every ``args`` of ``parts`` to up to ``torch.get_num_threads() - 1``
    helpers, which claim parts as they wake (tens of microseconds); :func:`finish_parts` runs the
    parts left on the calling thread. Between the two the caller may do other work."""
    job = _Job(fn, parts)
    helpers = min(len(parts), max(torch.get_num_threads(), 1), _CORES) - 1
    if helpers > 0:
        _HELPERS.post(job, helpers)
    return job


def finish_parts(job: _Job) -> None:
    """Runs the parts of ``job`` no helper has claimed on the calling thread, then waits for the
    helpers that did (spinning with the GIL released); a helper's error is raised."""
    job.work()
    while not _finished(job.state, _SPINS):
        time.sleep(_NAP_S)
    if job.errors:
        raise job.errors[0]


def run_parts(fn: Callable[..., None], parts: list[tuple]) -> None:
    """``fn(*args)`` for every ``args`` of ``parts``, on the calling thread and up to
    ``torch.get_num_threads() - 1`` helpers, each part on whichever thread claims it first (the
    calling thread claims the first). Returns when all are done; a helper's error is raised."""
    if len(parts) == 1:  # no job to share (batch 1's probe, merge and nearest list)
        fn(*parts[0])
        return
    finish_parts(start_parts(fn, parts))


def run_chunked(fn: Callable[..., None], args: tuple, n: int, min_per_thread: int) -> None:
    """``fn(*args, lo, hi)`` over ``[0, n)`` cut into at most ``torch.get_num_threads()`` chunks of
    at least ``min_per_thread`` items (:func:`run_parts`)."""
    threads = max(1, min(torch.get_num_threads(), n // min_per_thread))
    run_parts(fn, [(*args, n * t // threads, n * (t + 1) // threads) for t in range(threads)])
