"""MicroBatcher with a fake model: batch bounds, waiting, keys, ordering of control calls, errors."""

import asyncio
import threading
import time

import pytest

from sterling.serving.batcher import BatcherConfig, MicroBatcher, Overloaded


class Recorder:
    """A run_batch that records its batches and answers ``(key, payload * 10)``."""

    def __init__(self, delay: float = 0.0, fail_on=None):
        self.batches: list[tuple] = []
        self.delay, self.fail_on = delay, fail_on
        self.state = 0

    def __call__(self, key, payloads, waited):
        self.batches.append((key, list(payloads), self.state))
        time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in payloads:
            raise RuntimeError("the whole batch failed")
        return [ValueError(f"bad {p}") if p == "bad" else (key, p * 10, self.state) for p in payloads]


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_batches_within_max_batch():
    rec = Recorder(delay=0.01)
    batcher = MicroBatcher(rec, BatcherConfig(max_batch=4, max_wait_ms=50))

    async def go():
        return await asyncio.gather(*(batcher.submit("k", i) for i in range(10)))

    out = run(go())
    batcher.close()
    assert [o[1] for o in out] == [i * 10 for i in range(10)]
    sizes = [len(b[1]) for b in rec.batches]
    assert sum(sizes) == 10 and max(sizes) == 4 and all(s <= 4 for s in sizes)
    assert [p for b in rec.batches for p in b[1]] == list(range(10))  # oldest first


def test_a_lone_request_waits_about_max_wait():
    rec = Recorder()
    batcher = MicroBatcher(rec, BatcherConfig(max_batch=8, max_wait_ms=30))

    async def go():
        start = time.perf_counter()
        await batcher.submit("k", 1)
        return time.perf_counter() - start

    took = run(go())
    batcher.close()
    assert 0.025 <= took < 0.5 and rec.batches == [("k", [1], 0)]


def test_max_batch_one_never_waits():
    rec = Recorder()
    batcher = MicroBatcher(rec, BatcherConfig(max_batch=1, max_wait_ms=500))

    async def go():
        start = time.perf_counter()
        out = await asyncio.gather(*(batcher.submit("k", i) for i in range(3)))
        return out, time.perf_counter() - start

    out, took = run(go())
    batcher.close()
    assert took < 0.4 and [len(b[1]) for b in rec.batches] == [1, 1, 1]


def test_batches_hold_one_key():
    rec = Recorder(delay=0.02)
    batcher = MicroBatcher(rec, BatcherConfig(max_batch=16, max_wait_ms=30))

    async def go():
        return await asyncio.gather(*(batcher.submit(("retrieve", i % 3), i) for i in range(30)))

    out = run(go())
    batcher.close()
    assert [o[0] for o in out] == [("retrieve", i % 3) for i in range(30)]
    for key, payloads, _ in rec.batches:
        assert all(p % 3 == key[1] for p in payloads)


def test_control_calls_run_alone_and_in_order():
    rec = Recorder(delay=0.005)
    batcher = MicroBatcher(rec, BatcherConfig(max_batch=8, max_wait_ms=20))

    def bump():
        assert threading.current_thread().name == "sterling-batcher"
        rec.state += 1
        return rec.state

    async def go():
        before = [asyncio.ensure_future(batcher.submit("k", i)) for i in range(5)]
        await asyncio.sleep(0)  # queued before the call
        assert await batcher.call(bump) == 1
        after = await asyncio.gather(*(batcher.submit("k", i) for i in range(5, 9)))
        return await asyncio.gather(*before), after

    before, after = run(go())
    batcher.close()
    assert all(state == 0 for *_, state in before)  # answered before the update
    assert all(state == 1 for *_, state in after)  # a submit after an acknowledged call sees it


def test_a_failing_batch_fails_its_callers_and_the_worker_goes_on():
    rec = Recorder(fail_on=3)
    batcher = MicroBatcher(rec, BatcherConfig(max_batch=8, max_wait_ms=20))

    async def go():
        results = await asyncio.gather(*(batcher.submit("k", i) for i in range(6)), return_exceptions=True)
        later = await batcher.submit("k", 42)
        return results, later

    results, later = run(go())
    batcher.close()
    failing = next(payloads for _, payloads, _ in rec.batches if 3 in payloads)
    assert len(failing) > 1  # the error reaches every caller of the batch, and only them
    for i, r in enumerate(results):
        if i in failing:
            assert isinstance(r, RuntimeError) and str(r) == "the whole batch failed"
        else:
            assert r[1] == 10 * i
    assert later[1] == 420


def test_a_per_request_error_reaches_only_its_caller():
    batcher = MicroBatcher(Recorder(), BatcherConfig(max_batch=8, max_wait_ms=20))

    async def go():
        return await asyncio.gather(
            batcher.submit("k", 1), batcher.submit("k", "bad"), batcher.submit("k", 2), return_exceptions=True
        )

    one, bad, two = run(go())
    batcher.close()
    assert one[1] == 10 and two[1] == 20 and isinstance(bad, ValueError) and str(bad) == "bad bad"


def test_a_failing_control_call_reaches_its_caller_and_the_worker_goes_on():
    batcher = MicroBatcher(Recorder(), BatcherConfig(max_batch=4, max_wait_ms=5))

    def boom():
        raise KeyError("gone")

    async def go():
        with pytest.raises(KeyError, match="gone"):
            await batcher.call(boom)
        return await batcher.call(lambda: "after"), await batcher.submit("k", 1)

    assert run(go()) == ("after", ("k", 10, 0))
    batcher.close()


def test_a_control_call_is_not_overtaken_by_later_requests_of_a_forming_batch():
    rec = Recorder()
    batcher = MicroBatcher(rec, BatcherConfig(max_batch=8, max_wait_ms=100))
    order = []

    def mark():
        order.append("call")
        rec.state += 1

    async def go():
        first = asyncio.ensure_future(batcher.submit("k", 0))  # opens a batch that waits up to 100 ms
        await asyncio.sleep(0.01)
        call = asyncio.ensure_future(batcher.call(mark))
        await asyncio.sleep(0)
        later = asyncio.ensure_future(batcher.submit("k", 1))  # same key, queued after the call
        return await asyncio.gather(first, call, later)

    first, _, later = run(go())
    batcher.close()
    assert first[2] == 0 and later[2] == 1 and order == ["call"]
    assert [b[1] for b in rec.batches] == [[0], [1]]


def test_close_answers_the_waiting_requests_and_then_refuses():
    rec = Recorder(delay=0.01)
    batcher = MicroBatcher(rec, BatcherConfig(max_batch=2, max_wait_ms=5))

    async def go():
        waiting = [asyncio.ensure_future(batcher.submit("k", i)) for i in range(6)]
        await asyncio.sleep(0)
        await asyncio.get_running_loop().run_in_executor(None, batcher.close)
        out = await asyncio.gather(*waiting)
        with pytest.raises(Overloaded, match="shutting down"):
            await batcher.submit("k", 9)
        return out

    assert [o[1] for o in run(go())] == [10 * i for i in range(6)]


def test_a_full_queue_is_refused_at_once():
    gate = threading.Event()

    def slow(key, payloads, waited):
        gate.wait(5)
        return list(payloads)

    batcher = MicroBatcher(slow, BatcherConfig(max_batch=1, max_wait_ms=0, max_queue=3))

    async def go():
        first = asyncio.ensure_future(batcher.submit("k", 0))
        await asyncio.sleep(0.05)  # the worker holds request 0
        queued = [asyncio.ensure_future(batcher.submit("k", i)) for i in range(1, 4)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="max_queue 3"):
            await batcher.submit("k", 99)
        gate.set()
        return await asyncio.gather(first, *queued)

    assert run(go()) == [0, 1, 2, 3]
    batcher.close()


def test_a_result_count_mismatch_is_an_error_for_the_batch():
    batcher = MicroBatcher(lambda key, payloads, waited: [], BatcherConfig(max_batch=1))

    async def go():
        return await batcher.submit("k", 1)

    with pytest.raises(RuntimeError, match="answered 0 of 1"):
        run(go())
    batcher.close()


@pytest.mark.parametrize(
    "kwargs", [{"max_batch": 0}, {"max_batch": True}, {"max_wait_ms": -1}, {"max_wait_ms": 5000}, {"max_queue": 0}]
)
def test_config_is_checked(kwargs):
    with pytest.raises(ValueError):
        BatcherConfig(**kwargs)


def test_alive_until_closed():
    batcher = MicroBatcher(Recorder())
    assert batcher.alive
    batcher.close()
    assert not batcher.alive


def test_none_is_not_a_request_key():
    batcher = MicroBatcher(Recorder())
    with pytest.raises(ValueError, match="key"):
        run(batcher.submit(None, 1))
    batcher.close()
