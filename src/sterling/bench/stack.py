"""``sterling bench stack``: one model served as one snapshot, beside the conventional architecture
built from strong open parts, under the same open-loop load.

The same synthetic served-model snapshot (:func:`~sterling.testing.snapshots.build_serving_snapshot`,
the two-tower: three task queries, the MoL OverArch over up to 3·K0 merged candidates, the demo's
Value Model; 1,000,000 items by default) and the same request mix
(:func:`~sterling.testing.snapshots.request_mix`) are served two ways on 127.0.0.1, each component a
process of its own:

* ``sterling``: ``sterling serve`` on the snapshot: user tower → Bloom + int8 index → OverArch →
  Value Model in one forward, micro-batched (``max_batch``, ``max_wait_ms``);
* ``conventional``: a front service (user tower, micro-batched the same way) calling a filtering
  service (exact attribute index), an ANN service (FAISS IVF-SQ8 under an ``IDSelectorBitmap`` of
  the passing rows) and a ranking service (the same OverArch and Value Model over its own copy of
  the item cache), over HTTP (:mod:`sterling.bench.stack_services`, :mod:`sterling.bench.stack_front`;
  arrays as base64 of their bytes, :mod:`sterling.bench.stack_wire`).

Both stacks exclude the history's items from the answer (sterling's ``exclude_seen`` default).

**nprobe.** FAISS gets sterling's ``nlist``; its ``nprobe`` is the smallest (doubling, then
bisecting; up to ``nlist``) whose recall@K0 of the mix's task queries under their filters, against the exact
filtered top-K0 (brute force over the float item vectors), reaches sterling's index's at its
``nprobe`` (both measured here, the table kept in the JSON).

**Measured** per ladder step (the open-loop generator of :mod:`sterling.bench.serve`): P50 / P99
from the moment a request was due, CPU seconds per answered request (utime + stime from
``/proc/PID/stat`` of every process of the stack, summed), resident memory summed over the
processes (``VmRSS``) after the step, and the mean per-stage times of the answers' ``timing_ms``.
``max_qps_at_p99_budget``: the highest achieved rate of a step with P99 within the budget and no
error. **Recall@k** of each stack's final HTTP answers for ``recall_requests`` requests against the
exact answer of the same model: the exact filtered top-K0 per task query (brute force over the float
item vectors, the history excluded), then the same OverArch and Value Model
(:meth:`~sterling.retrieval.model.RetrievalModel.rank_candidates`), top-k.

The load generator runs on the same cores as the stacks, so the figures are lower bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from sterling.bench.ann import machine
from sterling.bench.report import Benchmark, comma_list, write_json
from sterling.bench.serve import ServerProcess, Step, best_qps, cached_snapshot, wait_ready
from sterling.bench.serve import ladder as serve_ladder
from sterling.bench.stack_probe import exact_answers, recall_at_k, tune_nprobe
from sterling.testing.snapshots import request_mix

__all__ = ["StackBenchConfig", "format_table", "run"]

STACKS = ("sterling", "conventional")


@dataclass(frozen=True)
class StackBenchConfig:
    """The comparison: ``num_items`` catalogue size; ``rates`` offered requests/s, one step of
    ``step_seconds`` each; ``p99_budget_ms``; ``max_batch`` / ``max_wait_ms`` of both stacks'
    micro-batchers; ``mix_size`` distinct requests; ``recall_requests`` requests whose recall (and
    the nprobe tuning's) is measured; ``threads``: torch / OpenMP threads of every process (None:
    torch's default)."""

    num_items: int = 1_000_000
    rates: tuple[float, ...] = (10, 15, 20, 25, 30, 40, 50, 60, 75, 100, 125, 150, 200, 250, 300, 400)
    step_seconds: float = 8.0
    p99_budget_ms: float = 50.0
    max_batch: int = 8
    max_wait_ms: float = 2.0
    mix_size: int = 2000
    recall_requests: int = 200
    max_inflight: int = 256
    seed: int = 0
    threads: int | None = None
    snapshot_dir: Path | None = field(default=None, compare=False)

    @classmethod
    def quick(cls) -> StackBenchConfig:
        """20,000 items and a short ladder (a minute or two)."""
        return cls(num_items=20_000, rates=(20, 50, 100), step_seconds=3.0, mix_size=300, recall_requests=50)


class _Service:
    """One service of the conventional stack in a child process on a free port; waits until ready."""

    def __init__(self, role: str, snapshot: Path, log_path: Path, threads: int | None, *extra: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.role, self.url, self.log_path = role, f"http://127.0.0.1:{port}", log_path
        cmd = [sys.executable, "-m", "sterling.bench.stack_services", "--role", role, "--snapshot", str(snapshot)]
        cmd += ["--port", str(port), *(("--threads", str(threads)) if threads else ()), *extra]
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)

    def wait(self) -> _Service:
        wait_ready(self.proc, self.url, self.log_path, f"the {self.role} service")
        return self

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def ladder(url: str, stack: str, pids: list[int], mix: list[dict], cfg: StackBenchConfig, log) -> list[dict]:
    """:func:`sterling.bench.serve.ladder` on ``url``, with CPU and memory of ``pids`` per step, as rows."""
    return [asdict(step) for step in await serve_ladder(url, stack, mix, cfg, log, pids=tuple(pids))]


async def _answers(url: str, mix: list[dict]) -> list[list[int]]:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        out = []
        for r in mix:  # one at a time: the answers, not the speed
            async with s.post(url + "/v1/retrieve", json=r) as answer:
                body = await answer.json(content_type=None)
                if answer.status != 200:
                    raise RuntimeError(f"{url} answered {answer.status}: {body}")
                out.append(body["ids"])
        return out


def _summary(rows: list[dict], cfg: StackBenchConfig, recall: float, extra: dict) -> dict:
    steps = [Step(**{k: v for k, v in r.items() if k in Step.__dataclass_fields__}) for r in rows]
    best = best_qps(steps, cfg.p99_budget_ms)
    within = [r for r in rows if r["p99_ms"] <= cfg.p99_budget_ms and r["errors"] == 0] or rows[:1]
    at = max(within, key=lambda r: r["achieved_qps"])
    return {
        "max_qps_at_p99_budget": best,
        "p50_ms_lowest_rate": rows[0]["p50_ms"],
        "p99_ms_lowest_rate": rows[0]["p99_ms"],
        "cpu_s_per_request": at["cpu_s_per_request"],
        "cpu_s_per_request_offered_qps": at["offered_qps"],
        "rss_mb": max(r["rss_mb"] for r in rows),
        "stages_ms": rows[0]["stages_ms"],
        "stages_offered_qps": rows[0]["offered_qps"],
        "recall_at_k": recall,
        **extra,
    }


def run(cfg: StackBenchConfig, log=print) -> dict:
    """Build (or reuse) the snapshot, tune FAISS's nprobe, run both stacks' ladders and recall."""
    from sterling.bench.stack_wire import Pieces

    with tempfile.TemporaryDirectory(prefix="sterling-stack-") as tmp:
        root = Path(cfg.snapshot_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        snapshot = root / f"serve-{cfg.num_items}-{cfg.seed}-{cfg.seed}"
        cached_snapshot(snapshot, log, num_items=cfg.num_items, seed=cfg.seed, model_seed=cfg.seed)
        pieces = Pieces.load(snapshot, keep_index=True)
        mix = [
            {"history": r["history"], "filter": r["filter"], "k": r["k"]}
            for r in request_mix(pieces.model, cfg.mix_size, seed=cfg.seed)
        ]
        random.Random(cfg.seed).shuffle(mix)
        probe = mix[: cfg.recall_requests]
        exact = exact_answers(pieces, probe)
        nlist = int(pieces.index.executor_tensors()["centroids"].shape[0])
        results, rows = {}, []
        threads = ("--threads", str(cfg.threads)) if cfg.threads else ()
        with ServerProcess(snapshot, cfg.max_batch, cfg.max_wait_ms, root / "stack-sterling.log", threads) as server:
            recall = recall_at_k(asyncio.run(_answers(server.url, probe)), exact)
            log(f"sterling: recall@k of the final answer {recall:.3f}")
            log(_HEADER)
            got = asyncio.run(ladder(server.url, "sterling", [server.proc.pid], mix, cfg, log))
            rows += got
            results["sterling"] = _summary(got, cfg, recall, {"nprobe": pieces.model.config.nprobe, "nlist": nlist})
        services = [
            _Service(role, snapshot, root / f"stack-{role}.log", cfg.threads, *extra)
            for role, extra in (("filter", ()), ("ann", ("--nlist", str(nlist))), ("ranking", ()))
        ]
        try:
            filter_svc, ann_svc, ranking_svc = (s.wait() for s in services)
            tuning = tune_nprobe(pieces, probe, filter_svc.url, ann_svc.url, nlist)
            log(
                f"FAISS IVF{nlist},SQ8 nprobe {tuning['nprobe']}: recall@K0 {tuning['faiss'][str(tuning['nprobe'])]:.3f} "
                f"vs sterling's {tuning['sterling']:.3f} (nprobe {pieces.model.config.nprobe})"
            )
            urls = ("--filter-url", filter_svc.url, "--ann-url", ann_svc.url, "--ranking-url", ranking_svc.url)
            batching = ("--max-batch", str(cfg.max_batch), "--max-wait-ms", str(cfg.max_wait_ms))
            front = _Service(
                "front",
                snapshot,
                root / "stack-front.log",
                cfg.threads,
                "--nprobe",
                str(tuning["nprobe"]),
                *urls,
                *batching,
            )
            services.append(front)
            front.wait()
            recall = recall_at_k(asyncio.run(_answers(front.url, probe)), exact)
            log(f"conventional: recall@k of the final answer {recall:.3f}")
            pids = [s.proc.pid for s in services]
            got = asyncio.run(ladder(front.url, "conventional", pids, mix, cfg, log))
            rows += got
            results["conventional"] = _summary(
                got, cfg, recall, {"nprobe": tuning["nprobe"], "nlist": nlist, "tuning": tuning}
            )
        finally:
            for s in services:
                s.stop()
    return {
        "machine": machine() | {"client": "aiohttp open loop, same machine as the stacks"},
        "config": {k: v for k, v in asdict(cfg).items() if k != "snapshot_dir"},
        "p99_budget_ms": cfg.p99_budget_ms,
        "k0": pieces.model.config.k0,
        "rows": rows,
        "stacks": results,
        "wire": "JSON bodies; arrays as base64 of their little-endian bytes (stack_wire)",
    }


_HEADER = f"{'stack':<13} {'offered':>8} {'achieved':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'cpu ms/req':>11} {'rss MB':>8}"


def _row(r: dict) -> str:
    return (
        f"{r['mode']:<13} {r['offered_qps']:>8.0f} {r['achieved_qps']:>9.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
        f"{r['errors']:>7d} {1e3 * r['cpu_s_per_request']:>11.1f} {r['rss_mb']:>8.0f}"
    )


def format_table(result: dict) -> str:
    """The steps of both stacks, then per stack its summary line and stage times."""
    lines = [_HEADER, *(_row(r) for r in result["rows"])]
    budget = result["p99_budget_ms"]
    for name, s in result["stacks"].items():
        stages = ", ".join(f"{k} {v:.1f}" for k, v in s["stages_ms"].items() if k != "total")
        lines.append(
            f"{name}: max QPS at P99 <= {budget:.0f} ms {s['max_qps_at_p99_budget']:.0f}; P50 {s['p50_ms_lowest_rate']:.1f} ms "
            f"at {s['stages_offered_qps']:.0f}/s; {1e3 * s['cpu_s_per_request']:.1f} CPU-ms/request "
            f"(at {s['cpu_s_per_request_offered_qps']:.0f}/s); RSS {s['rss_mb']:.0f} MB; recall@k {s['recall_at_k']:.3f} "
            f"(nprobe {s['nprobe']} of {s['nlist']})"
        )
        lines.append(f"  stages (ms, at {s['stages_offered_qps']:.0f}/s): {stages}")
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> Path:
    """P50 and P99 against offered load, both stacks, one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stack, color in zip(STACKS, ("tab:blue", "tab:orange")):
        rows = [r for r in result["rows"] if r["mode"] == stack]
        x = [r["offered_qps"] for r in rows]
        ax.plot(x, [r["p50_ms"] for r in rows], "o--", color=color, label=f"{stack} P50")
        ax.plot(x, [r["p99_ms"] for r in rows], "s-", color=color, label=f"{stack} P99")
    ax.axhline(result["p99_budget_ms"], color="grey", lw=0.8, ls=":", label="P99 budget")
    ax.set(
        xlabel="offered load (requests/s)",
        ylabel="latency (ms)",
        yscale="log",
        title="one model vs the conventional stack",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="20,000 items and a short ladder (a minute or two)")
    p.add_argument("--items", type=int, help="catalogue size (default 1,000,000)")
    p.add_argument("--snapshots", help="directory to build the snapshot in and reuse it from")
    p.add_argument("--threads", type=int, help="torch / OpenMP threads of every process (default torch's)")
    p.add_argument("--rates", metavar="LIST", help="offered requests/s of the ladder's steps, e.g. 10,20,50")
    p.add_argument(
        "--step-seconds", type=float, metavar="S", help="length of a ladder step (default 8; longer: steadier P99)"
    )
    p.add_argument("--json", help="write the rows and the summary here")
    p.add_argument("--plot", help="write latency against offered load (PNG) here")


def cli(args: argparse.Namespace) -> int:
    cfg = StackBenchConfig.quick() if args.quick else StackBenchConfig()
    if args.items:
        cfg = replace(cfg, num_items=args.items)
    if args.snapshots:
        cfg = replace(cfg, snapshot_dir=Path(args.snapshots))
    if args.threads:
        cfg = replace(cfg, threads=args.threads)
    if args.rates:
        rates = comma_list(args.rates, "--rates", float)
        if min(rates) <= 0:
            raise ValueError(f"--rates must be positive, got {args.rates!r}")
        cfg = replace(cfg, rates=tuple(sorted(rates)))
    if args.step_seconds is not None:
        if args.step_seconds <= 0:
            raise ValueError(f"--step-seconds must be positive, got {args.step_seconds}")
        cfg = replace(cfg, step_seconds=args.step_seconds)
    result = run(cfg)
    print(format_table(result))
    write_json(args.json, result)
    if args.plot:
        print(f"wrote {plot(result, args.plot)}")
    return 0


BENCHMARK = Benchmark(
    "stack",
    "one model (sterling serve) vs front + filtering + FAISS ANN + ranking services: latency, CPU, memory, recall",
    add_arguments,
    cli,
)
