"""Micro-batching: concurrent requests grouped into one forward, on one model thread.

The server's event loop hands each request to :meth:`MicroBatcher.submit` and awaits the result; a
single worker thread takes the oldest waiting request, keeps collecting requests with the same key
(e.g. the same Value Model formula) until ``max_batch`` of them are in hand or ``max_wait_ms`` has
passed since the first one arrived, and runs them as one batch. Under light load a request waits
at most ``max_wait_ms``; under heavy load batches fill up and throughput grows with the batch.

:meth:`MicroBatcher.call` runs a control function (an item update, a model swap) alone on the same
thread, between batches, in arrival order: a request submitted after an update was acknowledged is
answered by a model that holds it, and a swap never lands inside a batch.

The queue is bounded: past ``max_queue`` waiting requests :meth:`submit` raises :class:`Overloaded`
at once (the server answers 503) instead of letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["BatcherConfig", "MicroBatcher", "Overloaded"]


class Overloaded(RuntimeError):
    """The batcher's queue is full."""


@dataclass(frozen=True)
class BatcherConfig:
    """How requests are grouped.

    Args:
        max_batch (int): most requests in one forward (1: no batching).
        max_wait_ms (float): longest a request waits for others to join its batch.
        max_queue (int): most requests waiting; beyond it requests are refused (503).
    """

    max_batch: int = 8
    max_wait_ms: float = 2.0
    max_queue: int = 4096

    def __post_init__(self) -> None:
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {self.max_batch!r}")
        if not 0 <= self.max_wait_ms <= 1000:
            raise ValueError(f"max_wait_ms must be in [0, 1000], got {self.max_wait_ms!r}")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 1:
            raise ValueError(f"max_queue must be an int >= 1, got {self.max_queue!r}")


@dataclass
class _Job:
    key: Hashable | None  # None: a control function run alone
    payload: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float


#: ``run_batch(key, payloads, queued_s)`` answers a batch: one result (or an exception to raise to
#: that request's caller) per payload, in order; ``queued_s`` is each request's wait in seconds.
RunBatch = Callable[[Hashable, Sequence[Any], Sequence[float]], Sequence[Any]]


class MicroBatcher:
    """Groups submitted requests into batches for ``run_batch`` on one worker thread.

    Args:
        run_batch (RunBatch): answers a batch of payloads sharing a key.
        config (BatcherConfig): batch size, wait and queue bounds.
    """

    def __init__(self, run_batch: RunBatch, config: BatcherConfig = BatcherConfig()) -> None:
        self._run_batch = run_batch
        self.config = config
        self._jobs: collections.deque[_Job] = collections.deque()
        self._ready = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="sterling-batcher", daemon=True)
        self._worker.start()

    def __len__(self) -> int:
        """Requests waiting."""
        return len(self._jobs)

    @property
    def alive(self) -> bool:
        """Whether requests are being answered: not closed, and the worker thread running."""
        return not self._closed and self._worker.is_alive()

    async def submit(self, key: Hashable, payload: Any) -> Any:
        """The result of ``payload`` answered in a batch of requests with the same ``key``."""
        if key is None:
            raise ValueError("a request's key must not be None")
        return await self._enqueue(key, payload, bound=True)

    async def call(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run alone on the model thread, after everything submitted before it."""
        return await self._enqueue(None, fn, bound=False)

    def close(self) -> None:
        """Stop the worker once the waiting requests are answered."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        self._worker.join()

    async def _enqueue(self, key: Hashable | None, payload: Any, bound: bool) -> Any:
        loop = asyncio.get_running_loop()
        job = _Job(key, payload, loop.create_future(), loop, time.perf_counter())
        with self._ready:
            if self._closed:
                raise Overloaded("the server is shutting down")
            if bound and len(self._jobs) >= self.config.max_queue:
                raise Overloaded(f"{len(self._jobs)} requests are waiting (max_queue {self.config.max_queue})")
            self._jobs.append(job)
            self._ready.notify()
        return await job.future

    def _next_batch(self) -> list[_Job] | None:
        """The oldest job and those with its key that arrive within the wait (a control job alone)."""
        with self._ready:
            while not self._jobs:
                if self._closed:
                    return None
                self._ready.wait()
            first = self._jobs.popleft()
            if first.key is None or self.config.max_batch == 1:
                return [first]
            batch, deadline = [first], first.enqueued + self.config.max_wait_ms / 1000
            while len(batch) < self.config.max_batch:
                picked = self._take_same_key(first.key, self.config.max_batch - len(batch))
                batch += picked
                left = deadline - time.perf_counter()
                if len(batch) >= self.config.max_batch or left <= 0 or self._closed:
                    break
                if not picked:
                    self._ready.wait(left)
            return batch

    def _take_same_key(self, key: Hashable, room: int) -> list[_Job]:
        """Up to ``room`` queued jobs with ``key``, oldest first, stopping at a control job (it must
        run after every request queued before it and before every one queued after it)."""
        taken, kept = [], collections.deque()
        while self._jobs and len(taken) < room and self._jobs[0].key is not None:
            job = self._jobs.popleft()
            (taken if job.key == key else kept).append(job)
        self._jobs.extendleft(reversed(kept))
        return taken

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            now = time.perf_counter()
            try:
                if batch[0].key is None:
                    results: Sequence[Any] = [batch[0].payload()]
                else:
                    results = self._run_batch(
                        batch[0].key, [j.payload for j in batch], [now - j.enqueued for j in batch]
                    )
                    if len(results) != len(batch):
                        raise RuntimeError(f"run_batch answered {len(results)} of {len(batch)} requests")
            except BaseException as e:  # noqa: BLE001 - handed to every caller of the batch
                results = [e] * len(batch)
            for job, result in zip(batch, results):
                job.loop.call_soon_threadsafe(_settle, job.future, result)


def _settle(future: asyncio.Future, result: Any) -> None:
    if future.cancelled():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
