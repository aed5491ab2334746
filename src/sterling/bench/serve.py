"""``sterling bench serve``: the HTTP server under load, with and without micro-batching, and during a
snapshot swap with live item updates.

Set-up: a synthetic served-model snapshot (:func:`~sterling.testing.snapshots.build_serving_snapshot`,
1,000,000 items by default; a second one, other weights over the same catalogue, to swap to), each mode's server started
as its own process (``sterling serve``) on 127.0.0.1, and the request mix of
:func:`~sterling.testing.snapshots.request_mix` (histories of 10-100 items, filters from none to
rare, k from 10 to 100).

Load: an **open-loop** generator (aiohttp) sends requests at a fixed offered rate for a few seconds
per step, at rising rates; a request's latency counts from the moment it was due, so a server that
falls behind is charged for the queue (no coordinated omission). A step's ``achieved_qps`` is the
successful answers per second; ``errors`` counts non-200 answers, failed connections and timeouts.
The ladder stops once a step misses the P99 budget by far or the server falls well behind the rate.
``max_qps_at_p99_budget`` is the highest achieved rate of a step with P99 within the budget and no error.

Modes:

* ``batched``: the server's micro-batcher groups up to ``max_batch`` requests per forward;
* ``unbatched``: ``--max-batch 1``, one request per forward;
* ``swap_and_update``: the batched server at a steady rate while items are upserted and deleted
  through ``POST /v1/items`` and the snapshot is swapped back and forth through
  ``POST /v1/admin/reload``; afterwards every acknowledged upsert must be retrievable (each live item
  carries a unique ``creator`` value to filter on) and every acknowledged delete absent;
* ``swap_and_update_log``: the same with the server's durable update log (``sterling serve --log``,
  a fresh SQLite file): each ``/v1/items`` update is committed (fsync) before its 200;
* ``updates_sustained`` / ``updates_sustained_log``: on the same two servers right after, the cost of
  durability: ``sustained_writers`` writers send one- and two-item upserts through ``/v1/items``
  as fast as they are acknowledged for ``sustained_seconds`` while the read mix goes on at the
  swap step's offered rate; the acknowledged updates per second and the reads' P99, in memory and
  with the log. Afterwards every acknowledged upsert is looked up (``lost``: acknowledged, not
  found); the log's server is then killed (SIGKILL) and started again on its log, and every
  acknowledged update of both its steps is checked once more after the replay. Beside them, in
  process, the median time of one log append (one one-item upsert committed: the write path's
  fsync cost per update).

Every server is started explicitly with ``--no-log`` or a fresh ``--log``, so a re-run over reused
snapshots never replays an earlier run's updates.

Recall stands next to speed: the served index's recall@k0 of the task queries of the mix against the
exact filtered top-k0 (every list probed), on the same snapshot.

Towers (``--towers``, one block of rows each, side by side in one run): ``two_tower`` (the demo's
pooled tower, three task queries, the MoL OverArch over up to 3·K0 merged candidates), ``hstu`` /
``sasrec`` (a sequence user tower, one ``next`` query, candidates by cosine) and ``hstu+ranker`` /
``sasrec+ranker`` (the ``next`` query's K0 candidates scored by a request-level ranker, then the
demo's Value Model); see :func:`~sterling.testing.snapshots.build_serving_snapshot`. Each step
records the mean time per stage of its answers (the server's ``timing_ms``: ``queue``,
``user_tower``, ``ann``, ``overarch`` or ``ranker``, ``value_model``; a batched forward's stage
times are its whole batch's).

Per-candidate cost: in process, beside the load test, the scoring stage alone
(:meth:`~sterling.retrieval.model.RetrievalModel.task_scores_of`) for ``B`` requests of
``cost_candidates`` candidates after a ``cost_history``-event history: the MoL OverArch of the
two-tower model against the HSTU and SASRec rankers (M-FALCON / one target-aware pass), in µs per
candidate.

The client runs on the same 2 cores as the server (as a laptop would), so the figures are lower
bounds of what the server alone could do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from sterling.bench.ann import machine
from sterling.bench.report import Benchmark, write_json
from sterling.testing.snapshots import TOWERS, build_serving_snapshot, request_mix

__all__ = ["ServeBenchConfig", "candidate_cost", "format_table", "parse_towers", "run"]

MODES = ("batched", "unbatched", "swap_and_update", "swap_and_update_log")
#: What ``--towers all`` runs.
ALL_TOWERS = ("two_tower", "hstu", "hstu+ranker", "sasrec", "sasrec+ranker")
#: The scorers of the per-candidate cost: (tower, ranker) of their snapshots.
COST_SCORERS = {"mol_overarch": ("two_tower", False), "hstu_ranker": ("hstu", True), "sasrec_ranker": ("sasrec", True)}
_TOKEN = "bench-token"
_LIVE_ID = 10**15  # live items' ids start here
_LIVE_CREATOR = 10**9  # live items' creator values start here: unique, unlike any catalogue creator
_SUSTAINED_OFFSET = 10**8  # the sustained step's items: ids and creators this far above the swap step's


@dataclass(frozen=True)
class ServeBenchConfig:
    """The load test.

    Args:
        num_items (int): catalogue size of the synthetic snapshots.
        rates (tuple[float, ...]): offered requests/s, one step each, rising.
        step_seconds (float): length of a step.
        p99_budget_ms (float): the latency budget of ``max_qps_at_p99_budget``.
        max_batch (int): the batched server's ``--max-batch``.
        max_wait_ms (float): the batched server's ``--max-wait-ms``.
        swap_seconds (float): length of the swap-and-update run.
        swap_share (float): its offered rate, as a share of the batched max QPS at the budget.
        updates_per_s (float): item updates per second during it (every third one a delete).
        reloads (int): snapshot swaps during it.
        sustained_seconds (float): length of the sustained-updates step (per server: in memory, log).
        sustained_writers (int): its concurrent writers, each sending its next upsert once the last
            is acknowledged.
        mix_size (int): distinct requests drawn (cycled).
        recall_requests (int): requests of the mix whose recall is measured.
        max_inflight (int): most requests the client has open at once.
        seed (int): seed of the snapshots and the mix.
        towers (tuple[str, ...]): the served models compared, in order (:func:`parse_towers`).
        cost_candidates (int): candidates per request of the per-candidate cost.
        cost_history (int): history events per request of the per-candidate cost.
        cost_batches (tuple[int, ...]): requests per scoring call of the per-candidate cost.
        cost_seconds (float): time spent timing each of its cells.
        cost_items (int): catalogue size of its (small) snapshots.
        cost_threads (int): torch threads while timing it (1: CPU time per candidate, which the
            other load on a shared machine does not inflate through intra-op thread contention).
    """

    num_items: int = 1_000_000
    rates: tuple[float, ...] = (25, 50, 75, 100, 125, 150, 175, 200, 250, 300, 400, 500, 600)
    step_seconds: float = 8.0
    p99_budget_ms: float = 50.0
    max_batch: int = 8
    max_wait_ms: float = 2.0
    swap_seconds: float = 24.0
    swap_share: float = 0.5
    updates_per_s: float = 20.0
    reloads: int = 2
    sustained_seconds: float = 10.0
    sustained_writers: int = 4
    mix_size: int = 2000
    recall_requests: int = 200
    max_inflight: int = 256
    seed: int = 0
    towers: tuple[str, ...] = ("two_tower",)
    cost_candidates: int = 200
    cost_history: int = 100
    cost_batches: tuple[int, ...] = (1, 8)
    cost_seconds: float = 1.0
    cost_items: int = 5_000
    cost_threads: int = 1
    snapshot_dir: Path | None = field(default=None, compare=False)  # reuse / keep the snapshots here

    @classmethod
    def quick(cls) -> ServeBenchConfig:
        """A small catalogue and short steps (a minute in all)."""
        return cls(
            num_items=20_000,
            rates=(20, 50, 100),
            step_seconds=2.0,
            swap_seconds=5.0,
            updates_per_s=10.0,
            sustained_seconds=4.0,
            mix_size=300,
            recall_requests=50,
            cost_seconds=0.3,
        )


def parse_towers(spec: str, ranker: bool = False) -> tuple[str, ...]:
    """The towers of ``--towers`` (comma-separated: ``two_tower``, ``hstu``, ``sasrec``, a sequence
    tower with ``+ranker``, or ``all``); ``ranker``: every sequence tower with its ranker."""
    out: list[str] = []
    for name in (n.strip() for n in spec.split(",")):
        for n in ALL_TOWERS if name == "all" else (name,):
            tower, _, extra = n.partition("+")
            if tower not in TOWERS or extra not in ("", "ranker") or (extra and tower == "two_tower"):
                raise ValueError(
                    f"unknown tower {n!r}: expected {', '.join(TOWERS)}, hstu+ranker, sasrec+ranker or all"
                )
            n = f"{tower}+ranker" if ranker and tower != "two_tower" else n
            if n not in out:
                out.append(n)
    return tuple(out)


def _variant(name: str) -> tuple[str, bool]:
    """(tower, ranker) of a :func:`parse_towers` name."""
    tower, _, extra = name.partition("+")
    return tower, extra == "ranker"


@dataclass
class Step:
    """One step of load: what was offered and what came back."""

    mode: str
    offered_qps: float
    achieved_qps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int
    tower: str = ""
    stages_ms: dict[str, float] = field(default_factory=dict)  # mean of the answers' timing_ms per stage
    batch_size: float = 0.0  # mean requests per forward of the answers
    cpu_s_per_request: float | None = None  # CPU seconds of the measured processes per answer
    rss_mb: float | None = None  # their resident memory after the step, summed

    @classmethod
    def of(
        cls,
        mode: str,
        rate: float,
        latencies: list[float],
        errors: int,
        seconds: float,
        timings: list[dict] | None = None,
        tower: str = "",
    ) -> Step:
        lat = np.array(latencies) * 1e3 if latencies else np.array([float("nan")])
        timings = timings or []
        names = dict.fromkeys(k for t in timings for k in t if k != "batch_size")
        return cls(
            mode,
            rate,
            len(latencies) / seconds,
            float(np.percentile(lat, 50)),
            float(np.percentile(lat, 99)),
            errors,
            len(latencies) + errors,
            tower,
            {k: float(np.mean([t.get(k, 0.0) for t in timings])) for k in names},
            float(np.mean([t.get("batch_size", 1) for t in timings])) if timings else 0.0,
        )


class ServerProcess:
    """``sterling serve`` in a child process on a free port of 127.0.0.1 (``extra``: more arguments,
    e.g. ``--engine ray --shards 2``); a context manager that waits until it is ready.

    ``log_path`` takes the server's stderr; ``update_log``: the server's update log (``--log``), or
    None for live updates in memory only (``--no-log``: never the default log beside a reused
    snapshot, which would replay an earlier run's updates)."""

    def __init__(
        self,
        snapshot: Path,
        max_batch: int,
        max_wait_ms: float,
        log_path: Path,
        extra: tuple[str, ...] = (),
        update_log: Path | None = None,
    ) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "sterling",
            "serve",
            "--snapshot",
            str(snapshot),
            "--port",
            str(self.port),
            "--max-batch",
            str(max_batch),
            "--max-wait-ms",
            str(max_wait_ms),
            "--max-queue",
            "100000",
            *(("--no-log",) if update_log is None else ("--log", str(update_log))),
            *extra,
        ]
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                cmd, env={**os.environ, "STERLING_TOKEN": _TOKEN}, stdout=subprocess.DEVNULL, stderr=log
            )

    def __enter__(self) -> ServerProcess:
        wait_ready(self.proc, self.url, self.log_path, "the server")
        return self

    def kill(self) -> None:
        """SIGKILL the server (a crash: no shutdown code runs) and wait for it to go."""
        self.proc.kill()
        self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _post(session, url: str, body: dict, token: str | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with session.post(url, json=body, headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def _load(
    session,
    url: str,
    mix: list[dict],
    rate: float,
    seconds: float,
    max_inflight: int,
    versions: set | None = None,
    timings: list | None = None,
) -> tuple[list[float], int]:
    """Open-loop: request i is due at ``start + i / rate``; its latency counts from then (``timings``
    collects the answers' ``timing_ms``)."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(max_inflight)
    latencies: list[float] = []
    errors = 0
    start = loop.time() + 0.05

    async def one(i: int) -> None:
        nonlocal errors
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - loop.time()))
        async with gate:
            try:
                status, body = await _post(session, url + "/v1/retrieve", mix[i % len(mix)])
            except Exception:  # noqa: BLE001 - a failed connection or a timeout is an error of the step
                errors += 1
                return
        if status != 200:
            errors += 1
            return
        latencies.append(loop.time() - due)
        if versions is not None:
            versions.add(body["snapshot"])
        if timings is not None:
            timings.append(body.get("timing_ms", {}))

    await asyncio.gather(*(one(i) for i in range(max(1, int(rate * seconds)))))
    return latencies, errors


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of ``pids`` (all their threads), from ``/proc/PID/stat``."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat(5))
    return total / os.sysconf("SC_CLK_TCK")


def rss_mb(pids: list[int]) -> float:
    """The resident memory of ``pids``, summed (MiB, ``VmRSS``)."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


async def ladder(
    url: str, mode: str, mix: list[dict], cfg: ServeBenchConfig, log, tower: str = "", pids: tuple[int, ...] = ()
) -> list[Step]:
    """The open-loop steps at ``cfg.rates`` until saturation; with ``pids``, each step also holds
    those processes' CPU seconds per answer and their summed resident memory."""
    import aiohttp

    steps = []
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=cfg.max_inflight), timeout=timeout) as s:
        await _load(s, url, mix, 20, 1.0, cfg.max_inflight)  # warm the connections and the server
        for rate in cfg.rates:
            timings: list[dict] = []
            cpu = cpu_seconds(pids)
            latencies, errors = await _load(s, url, mix, rate, cfg.step_seconds, cfg.max_inflight, timings=timings)
            step = Step.of(mode, rate, latencies, errors, cfg.step_seconds, timings, tower)
            if pids:
                used = (cpu_seconds(pids) - cpu) / max(len(latencies), 1)
                step = replace(step, cpu_s_per_request=used, rss_mb=rss_mb(pids))
            steps.append(step)
            log(_row(step))
            if step.p99_ms > 4 * cfg.p99_budget_ms or step.achieved_qps < 0.8 * rate:
                break  # saturated: further steps only queue
    return steps


async def _swap_and_update(
    url: str,
    snapshots: tuple[Path, Path],
    mix: list[dict],
    rate: float,
    dim: int,
    cfg: ServeBenchConfig,
    log,
    tower: str = "",
    mode: str = "swap_and_update",
) -> tuple[Step, dict, tuple[list[int], list[int]]]:
    """Steady load while items are upserted / deleted and the snapshot swapped; then check every
    acknowledged update is visible (``mode``: the row's name). Returns the step, its summary and
    the acknowledged (upserted and still live, deleted) item ids."""
    import aiohttp

    rng = np.random.default_rng(cfg.seed + 7)
    upserted, deleted, failures, versions, timings = [], [], [], set(), []
    swaps: list[dict] = []

    async def updates(s) -> None:
        n = int(cfg.updates_per_s * cfg.swap_seconds)
        for i in range(n):
            await asyncio.sleep(1 / cfg.updates_per_s)
            if i % 3 == 2 and upserted:
                victim = upserted.pop(0)
                status, body = await _post(s, url + "/v1/items", {"delete": [victim]}, _TOKEN)
                (deleted.append(victim) if status == 200 else (failures.append(body), upserted.insert(0, victim)))
                continue
            item = _LIVE_ID + i
            status, answer = await _post(s, url + "/v1/items", {"upsert": [_live_item(item, rng, dim)]}, _TOKEN)
            (upserted.append(item) if status == 200 else failures.append(answer))

    async def reloads(s) -> None:
        for r in range(cfg.reloads):
            await asyncio.sleep(cfg.swap_seconds / (cfg.reloads + 1))
            start = time.perf_counter()
            status, body = await _post(s, url + "/v1/admin/reload", {"path": str(snapshots[(r + 1) % 2])}, _TOKEN)
            swaps.append({"status": status, "seconds": time.perf_counter() - start, "version": body.get("version")})
            if status != 200:
                failures.append(body)

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=cfg.max_inflight), timeout=timeout) as s:
        (latencies, errors), _, _ = await asyncio.gather(
            _load(s, url, mix, rate, cfg.swap_seconds, cfg.max_inflight, versions, timings), updates(s), reloads(s)
        )
        visible = await _swap_visible(s, url, upserted, deleted)
    step = Step.of(mode, rate, latencies, errors + len(failures), cfg.swap_seconds, timings, tower)
    log(_row(step))
    return (
        step,
        {
            "updates_acknowledged": len(upserted) + 2 * len(deleted),
            "updates_visible": visible,
            "upserts_live": len(upserted),
            "deletes": len(deleted),
            "swaps": swaps,
            "versions_seen": len(versions),
            "update_failures": failures[:5],
        },
        (upserted, deleted),
    )


def _live_item(item: int, rng: np.random.Generator, dim: int) -> dict:
    """A live item of ``/v1/items``: a random unit embedding and its own ``creator`` (:func:`_creator`)."""
    vector = rng.standard_normal(dim).astype(np.float32)
    return {
        "id": item,
        "embedding": (vector / np.linalg.norm(vector)).tolist(),
        "attributes": {"category": "music", "creator": _creator(item), "year": 2020},
    }


def _creator(item: int) -> int:
    """The unique ``creator`` value of a live item (no catalogue item has it)."""
    return _LIVE_CREATOR + item - _LIVE_ID


async def _found(s, url: str, item: int) -> bool | None:
    """Whether the live ``item`` is served (a filter on its creator; None: the request failed)."""
    status, body = await _post(s, url + "/v1/retrieve", {"history": [], "filter": f"creator:{_creator(item)}", "k": 1})
    return body["ids"] == [item] if status == 200 else None


async def _swap_visible(s, url: str, upserted: list[int], deleted: list[int]) -> int:
    """Acknowledged updates of the swap step whose effect holds: a live upsert found; a delete (and
    its upsert, 2 updates) absent."""
    visible = 0
    for item in upserted + deleted:
        live = item in upserted
        visible += (1 if live else 2) * int(await _found(s, url, item) is live)
    return visible


async def _served(s, url: str, items: list[int], group: int = 20, concurrency: int = 8) -> set[int]:
    """Which of the live ``items`` are served: ``group`` at a time (``creator IN (…)``, k = the
    group's size), each one missing from a group's answer asked once more on its own."""
    gate = asyncio.Semaphore(concurrency)

    async def one_group(chunk: list[int]) -> set[int]:
        async with gate:
            creators = ", ".join(str(_creator(i)) for i in chunk)
            body = {"history": [], "filter": f"creator IN ({creators})", "k": len(chunk)}
            status, answer = await _post(s, url + "/v1/retrieve", body)
            got = set(answer["ids"]) & set(chunk) if status == 200 else set()
            return got | {i for i in chunk if i not in got and await _found(s, url, i)}

    chunks = [items[i : i + group] for i in range(0, len(items), group)]
    return set().union(*await asyncio.gather(*(one_group(c) for c in chunks)))


async def _sustained_updates(
    url: str, mix: list[dict], rate: float, dim: int, cfg: ServeBenchConfig, log, tower: str, mode: str
) -> tuple[Step, dict, list[list[int]]]:
    """``cfg.sustained_writers`` writers upsert one or two live items per ``/v1/items`` update, each
    its next once the last is acknowledged, for ``cfg.sustained_seconds`` while the mix is read at
    ``rate``; then every acknowledged upsert is looked up. Returns the reads' step, the summary and
    the item ids of each acknowledged update."""
    import aiohttp

    rng = np.random.default_rng(cfg.seed + 11)
    acknowledged: list[list[int]] = []
    failures: list = []
    count = 0
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05  # as the read load's first request
    deadline = start + cfg.sustained_seconds

    async def writer(s) -> None:
        nonlocal count
        await asyncio.sleep(max(0.0, start - loop.time()))
        while loop.time() < deadline:
            j, count = count, count + 1
            items = [_LIVE_ID + _SUSTAINED_OFFSET + 2 * j + o for o in range(1 + j % 2)]  # one item, then two
            try:
                status, answer = await _post(
                    s, url + "/v1/items", {"upsert": [_live_item(i, rng, dim) for i in items]}, _TOKEN
                )
            except Exception as e:  # noqa: BLE001 - a failed connection or a timeout is a failed update
                status, answer = 0, repr(e)
            (acknowledged.append(items) if status == 200 else failures.append(answer))

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=cfg.max_inflight), timeout=timeout) as s:
        (latencies, errors), *_ = await asyncio.gather(
            _load(s, url, mix, rate, cfg.sustained_seconds, cfg.max_inflight),
            *(writer(s) for _ in range(cfg.sustained_writers)),
        )
        seconds = loop.time() - start  # the writers' last answers may come after the deadline
        served = await _served(s, url, [i for items in acknowledged for i in items])
    step = Step.of(mode, rate, latencies, errors, cfg.sustained_seconds, tower=tower)
    visible = sum(all(i in served for i in items) for items in acknowledged)
    summary = {
        "updates_per_s": len(acknowledged) / seconds,
        "items_per_s": sum(map(len, acknowledged)) / seconds,
        "updates_acknowledged": len(acknowledged),
        "updates_visible": visible,
        "lost": len(acknowledged) - visible,
        "update_failures": len(failures),
        "update_failure_examples": failures[:5],
        "seconds": seconds,
    }
    log(f"{_row(step)}  {summary['updates_per_s']:.0f} updates/s, {summary['lost']} lost")
    return step, summary, acknowledged


def index_recall(snapshot: Path, mix: list[dict], n: int) -> dict:
    """The served index's recall@k0 of the mix's task queries against exact filtered top-k0."""
    from sterling.retrieval.publish import load_model

    model = load_model(snapshot)
    reqs = mix[:n]
    inputs = model.inputs([r["history"] for r in reqs])
    _, queries = model.encode(inputs)
    b, t, d = queries.shape
    filters = [r["filter"] for r in reqs for _ in range(t)]
    k0, nlist = model.config.k0, model.index.executor_tensors()["centroids"].shape[0]
    served = model.index.search(queries.reshape(b * t, d), k=k0, filter=filters, nprobe=model.config.nprobe).ids
    exact = model.index.search(queries.reshape(b * t, d), k=k0, filter=filters, nprobe=nlist).ids
    hits = total = 0
    for got, want in zip(served.tolist(), exact.tolist()):
        want = {i for i in want if i >= 0}
        hits += len(want & set(got))
        total += len(want)
    return {
        "recall_at_k0": hits / max(total, 1),
        "k0": k0,
        "nprobe": model.config.nprobe,
        "nlist": nlist,
        "queries": b * t,
    }


def run(cfg: ServeBenchConfig, log=print) -> dict:
    """Build (or reuse) the snapshots, run the three modes per tower and the per-candidate cost,
    return the rows and the summaries (the first tower's also at the top level, as before towers)."""
    parse_towers(",".join(cfg.towers))  # a bad name fails before the work
    with tempfile.TemporaryDirectory(prefix="sterling-serve-") as tmp:
        root = Path(cfg.snapshot_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        rows: list[Step] = []
        variants: dict[str, dict] = {}
        for name in cfg.towers:
            steps, variants[name] = _run_tower(root, name, cfg, log)
            rows += steps
        cost = candidate_cost(root, cfg, log)
    first = variants[cfg.towers[0]]
    return {
        "machine": machine() | {"client": "aiohttp open loop, same machine as the server"},
        "config": {k: v for k, v in asdict(cfg).items() if k != "snapshot_dir"},
        "rows": [asdict(r) for r in rows],
        "p99_budget_ms": cfg.p99_budget_ms,
        "towers": list(cfg.towers),
        "variants": variants,
        "candidate_cost": cost,
        **{
            k: first[k]
            for k in (
                "max_qps_at_p99_budget",
                "updates_acknowledged",
                "updates_visible",
                "swap",
                "durable",
                "durability",
                "recall",
            )
        },
        "snapshot": first["snapshot"],
    }


def wait_ready(proc: subprocess.Popen, url: str, log_path: Path, what: str, timeout_s: float = 600) -> None:
    """Wait until ``url``/readyz answers 200; a clear error (with the end of ``log_path``) when the
    process exits first or ``timeout_s`` passes."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not become ready in {timeout_s:.0f} s")


def cached_snapshot(path: Path, log=print, **build) -> Path:
    """``path``, holding the synthetic served-model snapshot of
    :func:`~sterling.testing.snapshots.build_serving_snapshot` with ``build``'s arguments: built
    unless a complete one is there already (benchmarks reuse their ``--snapshots`` folder)."""
    if not (path / "manifest.json").is_file():
        start = time.perf_counter()
        build_serving_snapshot(path, **build)
        log(f"built {path} ({build['num_items']:,} items) in {time.perf_counter() - start:.0f} s")
    return path


def _snapshot_path(root: Path, name: str, cfg: ServeBenchConfig, model_seed: int) -> Path:
    """Where a tower's snapshot is built (the two-tower's under its name from before towers)."""
    prefix = "serve" if name == "two_tower" else f"serve-{name.replace('+', '-')}"
    return root / f"{prefix}-{cfg.num_items}-{cfg.seed}-{model_seed}"


def _run_tower(root: Path, name: str, cfg: ServeBenchConfig, log) -> tuple[list[Step], dict]:
    """The three modes on one tower's snapshot: its steps and summary."""
    tower, ranker = _variant(name)
    snapshots = []
    for model_seed in (cfg.seed, cfg.seed + 1):
        path = _snapshot_path(root, name, cfg, model_seed)
        build = {"num_items": cfg.num_items, "seed": cfg.seed, "model_seed": model_seed, "tower": tower}
        snapshots.append(cached_snapshot(path, log, **build, ranker=ranker))
    mix = request_mix(snapshots[0], cfg.mix_size, seed=cfg.seed)
    mix = [{"history": r["history"], "filter": r["filter"], "k": r["k"]} for r in mix]
    random.Random(cfg.seed).shuffle(mix)
    recall = index_recall(snapshots[0], mix, cfg.recall_requests)
    log(
        f"{name}: served index recall@{recall['k0']} = {recall['recall_at_k0']:.3f} (nprobe {recall['nprobe']} of "
        f"{recall['nlist']})"
    )
    log(_HEADER)
    steps: list[Step] = []
    best: dict[str, float] = {}
    for mode, batch in (("batched", cfg.max_batch), ("unbatched", 1)):
        log_path = root / f"server-{name.replace('+', '-')}-{mode}.log"
        with ServerProcess(snapshots[0], batch, cfg.max_wait_ms, log_path) as server:
            ladder_steps = asyncio.run(ladder(server.url, mode, mix, cfg, log, tower=name))
        steps += ladder_steps
        best[mode] = best_qps(ladder_steps, cfg.p99_budget_ms)
    rate = max(cfg.rates[0], cfg.swap_share * best["batched"])
    swaps, sustained = {}, {}
    for mode in ("swap_and_update", "swap_and_update_log"):  # live updates in memory, then durable (--log)
        log_path = root / f"server-{name.replace('+', '-')}-{mode}.log"
        updates = _fresh_log(root / f"updates-{name.replace('+', '-')}.sqlite") if mode.endswith("_log") else None
        key = "log" if updates else "memory"
        with ServerProcess(snapshots[0], cfg.max_batch, cfg.max_wait_ms, log_path, update_log=updates) as server:
            described = json.loads(urllib.request.urlopen(server.url + "/v1/snapshot").read())
            swap_step, swaps[mode], (upserted, deleted) = asyncio.run(
                _swap_and_update(
                    server.url, (snapshots[0], snapshots[1]), mix, rate, described["dim"], cfg, log, name, mode
                )
            )
            sustained_mode = mode.replace("swap_and_update", "updates_sustained")
            sustained_step, sustained[key], acknowledged = asyncio.run(
                _sustained_updates(server.url, mix, rate, described["dim"], cfg, log, name, sustained_mode)
            )
            if updates:
                server.kill()  # a crash after the last acknowledgement: the log must give every update back
        if updates:
            restart_log = root / f"server-{name.replace('+', '-')}-restart.log"
            sustained[key]["after_restart"] = _after_restart(
                snapshots[0], cfg, restart_log, updates, (upserted, deleted), acknowledged
            )
        steps += [swap_step, sustained_step]
        best[mode] = best_qps([swap_step], cfg.p99_budget_ms)
    swap, durable = swaps["swap_and_update"], swaps["swap_and_update_log"]
    durable["p99_ms"] = {m: next(s.p99_ms for s in steps if s.mode == m) for m in swaps}
    durable["offered_qps"] = rate
    durable["log_append_ms"] = log_append_ms(root, described["dim"])
    reads = {"memory": next(s for s in steps if s.mode == "updates_sustained")}
    reads["log"] = next(s for s in steps if s.mode == "updates_sustained_log")
    durability = {  # the cost of durability: in memory (--no-log) beside the log (--log), same offered reads
        "offered_qps": rate,
        "writers": cfg.sustained_writers,
        "seconds": cfg.sustained_seconds,
        **{
            k: {m: v[k] for m, v in sustained.items()}
            for k in (
                "updates_per_s",
                "items_per_s",
                "updates_acknowledged",
                "updates_visible",
                "lost",
                "update_failures",
            )
        },
        "p50_ms": {m: s.p50_ms for m, s in reads.items()},
        "p99_ms": {m: s.p99_ms for m, s in reads.items()},
        "read_errors": {m: s.errors for m, s in reads.items()},
        "swap_p99_ms": {
            "memory": durable["p99_ms"]["swap_and_update"],
            "log": durable["p99_ms"]["swap_and_update_log"],
        },
        "log_append_ms": durable["log_append_ms"],
        "after_restart": sustained["log"]["after_restart"],
    }
    batched = [s for s in steps if s.mode == "batched"]
    at_best = max(
        (s for s in batched if s.achieved_qps == best["batched"] and s.p99_ms <= cfg.p99_budget_ms),
        key=lambda s: s.offered_qps,
        default=batched[0],
    )
    summary = {
        "tower": tower,
        "ranker": ranker,
        "max_qps_at_p99_budget": best,
        "updates_acknowledged": swap["updates_acknowledged"],
        "updates_visible": swap["updates_visible"],
        "swap": swap,
        "durable": durable,
        "durability": durability,
        "recall": recall,
        "snapshot": {
            "num_items": cfg.num_items,
            "k0": recall["k0"],
            "tower": tower,
            "scorer": "ranker" if ranker else "mol" if tower == "two_tower" else "cosine",
            "tasks": described["tasks"],
            "queries": described["serving"].get("queries") or described["tasks"],
        },
        "stages_ms": {  # per stage: one request per forward at the lowest rate; batched at its best step
            "unbatched": next(s.stages_ms for s in steps if s.mode == "unbatched"),
            "batched": at_best.stages_ms,
            "batched_offered_qps": at_best.offered_qps,
            "batched_mean_batch": at_best.batch_size,
        },
    }
    return steps, summary


def _after_restart(
    snapshot: Path,
    cfg: ServeBenchConfig,
    log_path: Path,
    updates: Path,
    swapped: tuple[list[int], list[int]],
    sustained: list[list[int]],
) -> dict:
    """The server started again on its update log after a SIGKILL: the seconds until ready (the
    replay included), and how many acknowledged updates of the swap step (``swapped``: the items
    upserted and still live, those deleted) and of the sustained step (``sustained``: each update's
    items) hold after the replay."""
    upserted, deleted = swapped
    start = time.perf_counter()
    with ServerProcess(snapshot, cfg.max_batch, cfg.max_wait_ms, log_path, update_log=updates) as server:
        ready_s = time.perf_counter() - start
        described = json.loads(urllib.request.urlopen(server.url + "/v1/snapshot").read())

        async def check() -> tuple[int, set[int]]:
            import aiohttp

            items = [i for update in sustained for i in update]
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
                return await _swap_visible(s, server.url, upserted, deleted), await _served(s, server.url, items)

        swap_visible, served = asyncio.run(check())
    acknowledged = len(upserted) + 2 * len(deleted) + len(sustained)
    visible = swap_visible + sum(all(i in served for i in update) for update in sustained)
    return {
        "ready_s": ready_s,
        "log_last_seq": (described.get("update_log") or {}).get("last_seq"),
        "updates_acknowledged": acknowledged,
        "updates_visible": visible,
        "lost": acknowledged - visible,
    }


def _fresh_log(path: Path) -> Path:
    """``path`` with no update log there (an earlier run's database and its WAL removed)."""
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    return path


def log_append_ms(root: Path, dim: int, n: int = 200) -> float:
    """The median time (ms) of committing one one-item upsert to an update log in ``root``: the
    write path's fsync cost per update (:class:`~sterling.serving.update_log.UpdateLog`)."""
    import torch

    from sterling.serving.update_log import Update, UpdateLog

    log = UpdateLog(_fresh_log(root / "append-cost.sqlite"))
    times = []
    try:
        for i in range(n):
            update = Update([i], torch.randn(1, dim), [{"year": 2020}], [])
            start = time.perf_counter()
            log.append(update)
            times.append(time.perf_counter() - start)
    finally:
        log.close()
    return 1e3 * float(np.median(times))


def candidate_cost(root: Path, cfg: ServeBenchConfig, log=print) -> dict:
    """The scoring stage alone, in process: per scorer of :data:`COST_SCORERS` and batch size ``B``
    of ``cost_batches``, the median time of :meth:`RetrievalModel.task_scores_of` for ``B``
    requests of ``cost_candidates`` candidates after ``cost_history`` events, and per candidate,
    on ``cost_threads`` torch threads."""
    import torch

    m, h = cfg.cost_candidates, cfg.cost_history
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.cost_threads)
    try:
        rows = _cost_rows(root, cfg, log)
    finally:
        torch.set_num_threads(threads)
    return {"candidates": m, "history": h, "threads": cfg.cost_threads, "rows": rows}


def _cost_rows(root: Path, cfg: ServeBenchConfig, log) -> list[dict]:
    """The rows of :func:`candidate_cost`."""
    import torch

    from sterling.retrieval.publish import load_model

    m, h = cfg.cost_candidates, cfg.cost_history
    rows = []
    for scorer, (tower, ranker) in COST_SCORERS.items():
        path = root / f"cost-{scorer}-{cfg.cost_items}-{cfg.seed}"
        build = {"num_items": cfg.cost_items, "seed": cfg.seed, "tower": tower, "ranker": ranker, "k0": m}
        model = load_model(cached_snapshot(path, log, **build))
        ids = model.index.ids
        rng = np.random.default_rng(cfg.seed)
        for b in cfg.cost_batches:
            inputs = model.inputs([ids[rng.integers(0, len(ids), h)].tolist() for _ in range(b)])
            with torch.no_grad():
                users, queries = model.encode(inputs)
                state = model.items.state(torch.from_numpy(rng.integers(0, len(ids), (b, m))))  # [B, M, S]
                seconds = _median_time(model.task_scores_of, (inputs, users, queries, state), cfg.cost_seconds)
            rows.append(
                {
                    "scorer": scorer,
                    "batch": b,
                    "candidates": m,
                    "history": h,
                    "ms": 1e3 * seconds,
                    "us_per_candidate": 1e6 * seconds / (b * m),
                }
            )
            log(_cost_row(rows[-1]))
    return rows


def _median_time(fn, args: tuple, seconds: float) -> float:
    """The median seconds of ``fn(*args)`` over repeats for about ``seconds`` (at least 3, after 2 warm-ups)."""
    fn(*args), fn(*args)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def best_qps(steps: list[Step], budget_ms: float) -> float:
    ok = [s.achieved_qps for s in steps if s.p99_ms <= budget_ms and s.errors == 0]
    return max(ok, default=0.0)


_HEADER = f"{'tower':<15} {'mode':<21} {'offered':>8} {'achieved':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"


def _row(s: Step) -> str:
    row = f"{s.mode:<21} {s.offered_qps:>8.0f} {s.achieved_qps:>9.1f} {s.p50_ms:>8.1f} {s.p99_ms:>8.1f} {s.errors:>7d}"
    return f"{s.tower:<15} {row}" if s.tower else row


def _stages(stages: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in stages.items() if k not in ("queue", "total")) + " ms"


def _cost_row(r: dict) -> str:
    return (
        f"{r['scorer']:<15} B={r['batch']:<3d} {r['batch'] * r['candidates']:>6d} candidates {r['ms']:>8.2f} ms "
        f"{r['us_per_candidate']:>8.2f} us/candidate"
    )


def _durability(d: dict) -> list[str]:
    """The cost of durability, in memory beside the log, as lines of :func:`format_table`."""
    r = d["after_restart"]
    rows = [
        ("updates/s sustained", "updates_per_s", "{:.0f}"),
        ("items/s sustained", "items_per_s", "{:.0f}"),
        (f"read P50 ms at {d['offered_qps']:.0f}/s", "p50_ms", "{:.1f}"),
        (f"read P99 ms at {d['offered_qps']:.0f}/s", "p99_ms", "{:.1f}"),
        ("read errors", "read_errors", "{:d}"),
        ("swap step P99 ms", "swap_p99_ms", "{:.1f}"),
        ("updates acknowledged", "updates_acknowledged", "{:d}"),
        ("updates lost", "lost", "{:d}"),
        ("updates refused", "update_failures", "{:d}"),
    ]
    lines = [
        f"  cost of durability ({d['writers']} writers, as fast as acknowledged, {d['seconds']:.0f} s, reads at "
        f"{d['offered_qps']:.0f}/s):",
        f"    {'':<24} {'in memory':>10} {'with --log':>11}",
    ]
    lines += [
        f"    {label:<24} {fmt.format(d[key]['memory']):>10} {fmt.format(d[key]['log']):>11}"
        for label, key, fmt in rows
    ]
    lines.append(
        f"    one log append (fsync) {d['log_append_ms']:.2f} ms; after a SIGKILL and a restart on the log "
        f"({r['ready_s']:.1f} s to ready): {r['updates_visible']} of {r['updates_acknowledged']} acknowledged "
        f"updates hold, {r['lost']} lost"
    )
    return lines


def format_table(result: dict) -> str:
    """The rows and the summaries as text: per tower its steps, then per tower its max QPS at the
    budget, stage times, updates and recall, then the per-candidate cost."""
    lines = [_HEADER]
    lines += [_row(Step(**r)) for r in result["rows"]]
    budget = result["p99_budget_ms"]
    for name, v in result.get("variants", {"": result}).items():
        best = v["max_qps_at_p99_budget"]
        lines.append(
            f"{name + ': ' if name else ''}max QPS at P99 <= {budget:.0f} ms: "
            + ", ".join(f"{m} {q:.0f}" for m, q in best.items())
            + (f" (batching {best['batched'] / best['unbatched']:.1f}x)" if best.get("unbatched") else "")
        )
        if "stages_ms" in v:
            st = v["stages_ms"]
            lines.append(
                f"  stages: unbatched {_stages(st['unbatched'])}; batched at {st['batched_offered_qps']:.0f}/s "
                f"(mean batch {st['batched_mean_batch']:.1f}) {_stages(st['batched'])}"
            )
        lines.append(
            f"  updates acknowledged {v['updates_acknowledged']}, visible afterwards "
            f"{v['updates_visible']}; swaps {[(s['status'], round(s['seconds'], 1)) for s in v['swap']['swaps']]}"
        )
        if "durable" in v:
            d = v["durable"]
            lines.append(
                f"  with --log (durable): updates acknowledged {d['updates_acknowledged']}, visible afterwards "
                f"{d['updates_visible']}; P99 {d['p99_ms']['swap_and_update_log']:.1f} ms vs "
                f"{d['p99_ms']['swap_and_update']:.1f} ms in memory at {d['offered_qps']:.0f}/s; one log append "
                f"(fsync) {d['log_append_ms']:.2f} ms"
            )
        if "durability" in v:
            lines += _durability(v["durability"])
        r = v["recall"]
        lines.append(
            f"  served index recall@{r['k0']} {r['recall_at_k0']:.3f} (nprobe {r['nprobe']} of {r['nlist']}), "
            f"{v['snapshot']['num_items']:,} items"
        )
    if len(result.get("variants", {})) > 1:
        lines.append(
            f"max QPS at P99 <= {budget:.0f} ms, batched: "
            + ", ".join(f"{n} {v['max_qps_at_p99_budget']['batched']:.0f}" for n, v in result["variants"].items())
        )
    if "candidate_cost" in result:
        c = result["candidate_cost"]
        lines.append(
            f"scoring cost per candidate (history {c['history']}, {c['candidates']} candidates a request, "
            f"{c['threads']} thread{'s' if c['threads'] > 1 else ''}):"
        )
        lines += [_cost_row(r) for r in c["rows"]]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="20,000 items and short steps (about a minute)")
    p.add_argument("--items", type=int, help="catalogue size (default 1,000,000)")
    p.add_argument("--snapshots", help="directory to build the snapshots in and reuse them from")
    p.add_argument(
        "--tower",
        "--towers",
        dest="towers",
        default="two_tower",
        help="served models, comma-separated, side by side: two_tower, hstu, sasrec, hstu+ranker, "
        "sasrec+ranker, or all (default two_tower)",
    )
    p.add_argument("--ranker", action="store_true", help="score each sequence tower's candidates with a ranker")
    p.add_argument("--json", help="write the rows and the summary here")


def cli(args: argparse.Namespace) -> int:
    cfg = ServeBenchConfig.quick() if args.quick else ServeBenchConfig()
    if args.items:
        cfg = ServeBenchConfig(**{**asdict(cfg), "num_items": args.items})
    if args.snapshots:
        cfg = ServeBenchConfig(**{**asdict(cfg), "snapshot_dir": Path(args.snapshots)})
    cfg = ServeBenchConfig(**{**asdict(cfg), "towers": parse_towers(args.towers, args.ranker)})
    result = run(cfg)
    print(format_table(result))
    write_json(args.json, result)
    return 0


BENCHMARK = Benchmark(
    "serve",
    "the HTTP server under load: max QPS at a P99 budget, batched vs not, swap + live updates, per tower",
    add_arguments,
    cli,
)
