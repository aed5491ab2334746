"""The CPU kernels' shared threads: ``run_parts`` runs every part once, whichever thread claims it,
raises a helper's error, and the atomics it is built on count exactly under contention."""

from __future__ import annotations

import threading
import time

import numba
import numpy as np
import pytest
import torch

from sterling.ops.cpu import threads
from sterling.ops.cpu.atomics import fetch_add, load
from sterling.ops.cpu.threads import run_chunked, run_parts


@numba.njit(nogil=True)
def _add_many(counts, times):
    for _ in range(times):
        fetch_add(counts, 0, 1)
    return load(counts, 0)


def test_fetch_add_counts_exactly_from_threads_at_once() -> None:
    counts = np.zeros(2, dtype=np.int64)
    workers = [threading.Thread(target=_add_many, args=(counts, 200_000)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert counts.tolist() == [800_000, 0]


@numba.njit(nogil=True)
def _mark(hits, i, slow):
    for _ in range(slow):  # long enough for helpers to wake and claim parts
        fetch_add(hits, len(hits) - 1, 0)
    fetch_add(hits, i, 1)


@pytest.mark.parametrize("threads_used", [1, 2, 4])
@pytest.mark.parametrize("slow", [0, 20_000])
def test_run_parts_runs_every_part_once(threads_used: int, slow: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads_used)
    try:
        for parts in (1, 3, 17):
            hits = np.zeros(parts + 1, dtype=np.int64)
            run_parts(_mark, [(hits, i, slow) for i in range(parts)])
            assert hits[:parts].tolist() == [1] * parts  # each once, all done on return
    finally:
        torch.set_num_threads(before)


def test_the_caller_waits_for_a_helpers_part() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    caller = threading.get_ident()
    done = []

    def part(i):
        time.sleep(0.02 if threading.get_ident() == caller else 0.1)  # the helper claims part 1 first
        done.append(i)

    try:
        run_parts(part, [(0,), (1,)])
        assert sorted(done) == [0, 1]
    finally:
        torch.set_num_threads(before)


def test_concurrent_callers_each_get_all_their_parts() -> None:
    """Callers on several threads (a server's) share the helpers: every call's parts run once and
    every call returns."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    failures = []

    def caller(seed: int) -> None:
        for call in range(200):
            hits = np.zeros(6, dtype=np.int64)
            run_parts(_mark, [(hits, i, 200 * ((seed + call + i) % 3)) for i in range(5)])
            if hits[:5].tolist() != [1] * 5:
                failures.append((seed, call, hits.tolist()))

    try:
        callers = [threading.Thread(target=caller, args=(seed,)) for seed in range(3)]
        for c in callers:
            c.start()
        for c in callers:
            c.join(timeout=60)
        assert not any(c.is_alive() for c in callers) and not failures
    finally:
        torch.set_num_threads(before)


def test_run_chunked_covers_the_range_once() -> None:
    seen = np.zeros(1000, dtype=np.int64)

    def mark(out, lo, hi):
        out[lo:hi] += 1

    run_chunked(mark, (seen,), 1000, 7)
    assert (seen == 1).all()


def test_a_helpers_error_is_raised_on_the_caller() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    caller = threading.get_ident()

    def part(i):
        if threading.get_ident() != caller:
            raise RuntimeError("helper failed")
        time.sleep(0.05)  # the caller lingers on its part: the helper claims the other

    try:
        with pytest.raises(RuntimeError, match="helper failed"):
            run_parts(part, [(0,), (1,)])
    finally:
        torch.set_num_threads(before)


def test_the_caller_does_all_parts_when_no_helper_serves() -> None:
    before, helpers = torch.get_num_threads(), threads._HELPERS
    threads._HELPERS = threads._Helpers()
    threads._HELPERS.threads = [threading.Thread(target=lambda: None)] * 8  # nothing serves the queue
    torch.set_num_threads(4)
    try:
        done = []
        run_parts(lambda i: done.append(i), [(i,) for i in range(5)])
        assert sorted(done) == [0, 1, 2, 3, 4]
    finally:
        threads._HELPERS = helpers
        torch.set_num_threads(before)
