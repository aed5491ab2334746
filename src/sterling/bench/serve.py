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
  carries a unique ``creator`` value to filter on) and every acknowledged delete absent.

Recall stands next to speed: the served index's recall@k0 of the task queries of the mix against the
exact filtered top-k0 (every list probed), on the same snapshot.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sterling.bench.ann import machine
from sterling.bench.report import Benchmark, write_json
from sterling.testing.snapshots import build_serving_snapshot, request_mix

__all__ = ["ServeBenchConfig", "format_table", "run"]

MODES = ("batched", "unbatched", "swap_and_update")
_TOKEN = "bench-token"
_LIVE_CREATOR = 10**9  # live items' creator values start here: unique, unlike any catalogue creator


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
        mix_size (int): distinct requests drawn (cycled).
        recall_requests (int): requests of the mix whose recall is measured.
        max_inflight (int): most requests the client has open at once.
        seed (int): seed of the snapshots and the mix.
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
    mix_size: int = 2000
    recall_requests: int = 200
    max_inflight: int = 256
    seed: int = 0
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
            mix_size=300,
            recall_requests=50,
        )


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

    @classmethod
    def of(cls, mode: str, rate: float, latencies: list[float], errors: int, seconds: float) -> Step:
        lat = np.array(latencies) * 1e3 if latencies else np.array([float("nan")])
        return cls(
            mode,
            rate,
            len(latencies) / seconds,
            float(np.percentile(lat, 50)),
            float(np.percentile(lat, 99)),
            errors,
            len(latencies) + errors,
        )


class ServerProcess:
    """``sterling serve`` in a child process on a free port of 127.0.0.1 (``extra``: more arguments,
    e.g. ``--engine ray --shards 2``); a context manager that waits until it is ready."""

    def __init__(
        self, snapshot: Path, max_batch: int, max_wait_ms: float, log_path: Path, extra: tuple[str, ...] = ()
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
            *extra,
        ]
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                cmd, env={**os.environ, "STERLING_TOKEN": _TOKEN}, stdout=subprocess.DEVNULL, stderr=log
            )

    def __enter__(self) -> ServerProcess:
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the server did not become ready in 10 minutes")

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
    session, url: str, mix: list[dict], rate: float, seconds: float, max_inflight: int, versions: set | None = None
) -> tuple[list[float], int]:
    """Open-loop: request i is due at ``start + i / rate``; its latency counts from then."""
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

    await asyncio.gather(*(one(i) for i in range(max(1, int(rate * seconds)))))
    return latencies, errors


async def ladder(url: str, mode: str, mix: list[dict], cfg: ServeBenchConfig, log) -> list[Step]:
    import aiohttp

    steps = []
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=cfg.max_inflight), timeout=timeout) as s:
        await _load(s, url, mix, 20, 1.0, cfg.max_inflight)  # warm the connections and the server
        for rate in cfg.rates:
            latencies, errors = await _load(s, url, mix, rate, cfg.step_seconds, cfg.max_inflight)
            step = Step.of(mode, rate, latencies, errors, cfg.step_seconds)
            steps.append(step)
            log(_row(step))
            if step.p99_ms > 4 * cfg.p99_budget_ms or step.achieved_qps < 0.8 * rate:
                break  # saturated: further steps only queue
    return steps


async def _swap_and_update(
    url: str, snapshots: tuple[Path, Path], mix: list[dict], rate: float, dim: int, cfg: ServeBenchConfig, log
) -> tuple[Step, dict]:
    """Steady load while items are upserted / deleted and the snapshot swapped; then check every
    acknowledged update is visible."""
    import aiohttp

    rng = np.random.default_rng(cfg.seed + 7)
    upserted, deleted, failures, versions = [], [], [], set()
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
            item = 10**15 + i
            vector = rng.standard_normal(dim).astype(np.float32)
            body = {
                "upsert": [
                    {
                        "id": item,
                        "embedding": (vector / np.linalg.norm(vector)).tolist(),
                        "attributes": {"category": "music", "creator": _LIVE_CREATOR + i, "year": 2020},
                    }
                ]
            }
            status, answer = await _post(s, url + "/v1/items", body, _TOKEN)
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
            _load(s, url, mix, rate, cfg.swap_seconds, cfg.max_inflight, versions), updates(s), reloads(s)
        )
        visible = 0  # acknowledged updates whose effect holds: a live upsert found; a delete (and its upsert) absent
        for item in upserted + deleted:
            creator = _LIVE_CREATOR + item - 10**15
            status, body = await _post(s, url + "/v1/retrieve", {"history": [], "filter": f"creator:{creator}", "k": 1})
            live = item in upserted
            visible += (1 if live else 2) * int(status == 200 and body["ids"] == ([item] if live else []))
    step = Step.of("swap_and_update", rate, latencies, errors + len(failures), cfg.swap_seconds)
    log(_row(step))
    return step, {
        "updates_acknowledged": len(upserted) + 2 * len(deleted),
        "updates_visible": visible,
        "upserts_live": len(upserted),
        "deletes": len(deleted),
        "swaps": swaps,
        "versions_seen": len(versions),
        "update_failures": failures[:5],
    }


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
    """Build (or reuse) the snapshots, run the three modes, return the rows and the summary."""
    with tempfile.TemporaryDirectory(prefix="sterling-serve-") as tmp:
        root = Path(cfg.snapshot_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        snapshots = []
        for model_seed in (cfg.seed, cfg.seed + 1):
            path = root / f"serve-{cfg.num_items}-{cfg.seed}-{model_seed}"
            if not (path / "manifest.json").is_file():
                start = time.perf_counter()
                build_serving_snapshot(path, num_items=cfg.num_items, seed=cfg.seed, model_seed=model_seed)
                log(f"built {path} ({cfg.num_items:,} items) in {time.perf_counter() - start:.0f} s")
            snapshots.append(path)
        mix = request_mix(snapshots[0], cfg.mix_size, seed=cfg.seed)
        mix = [{"history": r["history"], "filter": r["filter"], "k": r["k"]} for r in mix]
        random.Random(cfg.seed).shuffle(mix)
        recall = index_recall(snapshots[0], mix, cfg.recall_requests)
        log(
            f"served index recall@{recall['k0']} = {recall['recall_at_k0']:.3f} (nprobe {recall['nprobe']} of "
            f"{recall['nlist']})"
        )
        log(f"{'mode':<16} {'offered':>8} {'achieved':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
        rows: list[Step] = []
        best: dict[str, float] = {}
        for mode, batch in (("batched", cfg.max_batch), ("unbatched", 1)):
            with ServerProcess(snapshots[0], batch, cfg.max_wait_ms, root / f"server-{mode}.log") as server:
                steps = asyncio.run(ladder(server.url, mode, mix, cfg, log))
            rows += steps
            best[mode] = best_qps(steps, cfg.p99_budget_ms)
        rate = max(cfg.rates[0], cfg.swap_share * best["batched"])
        with ServerProcess(snapshots[0], cfg.max_batch, cfg.max_wait_ms, root / "server-swap.log") as server:
            dim = json.loads(urllib.request.urlopen(server.url + "/v1/snapshot").read())["dim"]
            swap_step, swap = asyncio.run(
                _swap_and_update(server.url, (snapshots[0], snapshots[1]), mix, rate, dim, cfg, log)
            )
        rows.append(swap_step)
        best["swap_and_update"] = best_qps([swap_step], cfg.p99_budget_ms)
    return {
        "machine": machine() | {"client": "aiohttp open loop, same machine as the server"},
        "config": {k: v for k, v in asdict(cfg).items() if k != "snapshot_dir"},
        "rows": [asdict(r) for r in rows],
        "p99_budget_ms": cfg.p99_budget_ms,
        "max_qps_at_p99_budget": best,
        "updates_acknowledged": swap["updates_acknowledged"],
        "updates_visible": swap["updates_visible"],
        "swap": swap,
        "recall": recall,
        "snapshot": {"num_items": cfg.num_items, "k0": recall["k0"], "overarch": "mol"},
    }


def best_qps(steps: list[Step], budget_ms: float) -> float:
    ok = [s.achieved_qps for s in steps if s.p99_ms <= budget_ms and s.errors == 0]
    return max(ok, default=0.0)


def _row(s: Step) -> str:
    return f"{s.mode:<16} {s.offered_qps:>8.0f} {s.achieved_qps:>9.1f} {s.p50_ms:>8.1f} {s.p99_ms:>8.1f} {s.errors:>7d}"


def format_table(result: dict) -> str:
    """The rows and the summary as text."""
    lines = [f"{'mode':<16} {'offered':>8} {'achieved':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"]
    lines += [_row(Step(**r)) for r in result["rows"]]
    best = result["max_qps_at_p99_budget"]
    lines.append(
        f"max QPS at P99 <= {result['p99_budget_ms']:.0f} ms: "
        + ", ".join(f"{m} {q:.0f}" for m, q in best.items())
        + (f" (batching {best['batched'] / best['unbatched']:.1f}x)" if best.get("unbatched") else "")
    )
    lines.append(
        f"updates acknowledged {result['updates_acknowledged']}, visible afterwards "
        f"{result['updates_visible']}; swaps {[(s['status'], round(s['seconds'], 1)) for s in result['swap']['swaps']]}"
    )
    r = result["recall"]
    lines.append(
        f"served index recall@{r['k0']} {r['recall_at_k0']:.3f} (nprobe {r['nprobe']} of {r['nlist']}), "
        f"{result['snapshot']['num_items']:,} items"
    )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="20,000 items and short steps (about a minute)")
    p.add_argument("--items", type=int, help="catalogue size (default 1,000,000)")
    p.add_argument("--snapshots", help="directory to build the snapshots in and reuse them from")
    p.add_argument("--json", help="write the rows and the summary here")


def cli(args: argparse.Namespace) -> int:
    cfg = ServeBenchConfig.quick() if args.quick else ServeBenchConfig()
    if args.items:
        cfg = ServeBenchConfig(**{**asdict(cfg), "num_items": args.items})
    if args.snapshots:
        cfg = ServeBenchConfig(**{**asdict(cfg), "snapshot_dir": Path(args.snapshots)})
    result = run(cfg)
    print(format_table(result))
    write_json(args.json, result)
    return 0


BENCHMARK = Benchmark(
    "serve",
    "the HTTP server under load: max QPS at a P99 budget, batched vs not, swap + live updates",
    add_arguments,
    cli,
)
