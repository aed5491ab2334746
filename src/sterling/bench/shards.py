"""``sterling bench shards``: item-sharded serving on Ray Serve, 1 shard vs 2, beside the
single-process server, in one run (``[ray]`` and ``[serve]`` extras).

Set-up: the synthetic served-model snapshot of ``sterling bench serve``
(:func:`~sterling.testing.snapshots.build_serving_snapshot`, 1,000,000 items by default), split
into 1 and 2 item shards (:func:`~sterling.serving.shards.split_snapshot`); each server in its own
process on 127.0.0.1 (``sterling serve`` and ``sterling serve --engine ray --shards N``), all with
the same micro-batching. Load: the open-loop ladder of ``bench serve`` on its request mix; the
figure is the highest achieved rate with P99 within the budget and no error.

Quality next to speed: for ``agreement_requests`` requests of the mix, the share of the
single-process server's top-k ids that each sharded app returns too (1.0 when every list is
probed; with fewer probes each shard plans its own, usually probing more), and the single server's
served-index recall@k0.

Caveat: the shards, the ingress, Ray's own processes and the load generator all share the
machine's cores (2 here), so sharding cannot add compute; it shows the cost of the fan-out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from sterling.bench.ann import machine
from sterling.bench.report import Benchmark, write_json
from sterling.bench.serve import (
    ServeBenchConfig,
    ServerProcess,
    Step,
    best_qps,
    cached_snapshot,
    index_recall,
    ladder,
)
from sterling.serving.shards import split_snapshot
from sterling.testing.snapshots import request_mix

__all__ = ["ShardsBenchConfig", "run"]

#: The ladder starts lower than ``bench serve``'s: the Ray apps saturate near 50 requests/s here.
RATES = (10, 20, 30, 40, 50, 75, 100, 125, 150, 175, 200, 250, 300)


@dataclass(frozen=True)
class ShardsBenchConfig:
    """The load test (``load``: the ladder, budget, batching and mix of ``bench serve``).

    Args:
        shards (tuple[int, ...]): the sharded apps to run.
        agreement_requests (int): requests whose answers are compared with the single server's.
        snapshot_dir (Path | None): build the snapshot here and reuse it.
    """

    load: ServeBenchConfig = field(default_factory=lambda: ServeBenchConfig(rates=RATES))
    shards: tuple[int, ...] = (1, 2)
    agreement_requests: int = 100
    snapshot_dir: Path | None = field(default=None, compare=False)

    @classmethod
    def quick(cls) -> ShardsBenchConfig:
        return cls(load=replace(ServeBenchConfig.quick(), rates=(10, 25, 50, 100)), agreement_requests=30)


def _answers(url: str, mix: list[dict]) -> list[list[int]]:
    out = []
    for body in mix:
        request = urllib.request.Request(
            url + "/v1/retrieve", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            out.append(json.loads(r.read())["ids"])
    return out


def sustained_qps(steps: list[Step]) -> float:
    """The highest achieved rate of a step that kept up (95% of the offered rate) without errors."""
    return max((s.achieved_qps for s in steps if s.errors == 0 and s.achieved_qps >= 0.95 * s.offered_qps), default=0.0)


def _agreement(answers: list[list[int]], reference: list[list[int]]) -> float:
    shares = [len(set(a) & set(r)) / len(r) for a, r in zip(answers, reference) if r]
    return sum(shares) / max(len(shares), 1)


def run(cfg: ShardsBenchConfig, log=print) -> dict:
    load = cfg.load
    with tempfile.TemporaryDirectory(prefix="sterling-shards-") as tmp:
        root = Path(cfg.snapshot_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        snapshot = root / f"serve-{load.num_items}-{load.seed}-{load.seed}"
        cached_snapshot(snapshot, log, num_items=load.num_items, seed=load.seed, model_seed=load.seed)
        mix = [
            {"history": r["history"], "filter": r["filter"], "k": r["k"]}
            for r in request_mix(snapshot, load.mix_size, seed=load.seed)
        ]
        random.Random(load.seed).shuffle(mix)
        recall = index_recall(snapshot, mix, load.recall_requests)
        probe = mix[: cfg.agreement_requests]
        servers = [("single", snapshot, ())]
        for n in cfg.shards:
            servers.append(
                (
                    f"ray_{n}_shard{'s' if n > 1 else ''}",
                    split_snapshot(snapshot, root / f"shards-{n}", n),
                    ("--engine", "ray"),
                )
            )
        rows: list[Step] = []
        best, sustained, first_p50, agreement, reference = {}, {}, {}, {}, None
        for mode, path, extra in servers:
            with ServerProcess(path, load.max_batch, load.max_wait_ms, root / f"server-{mode}.log", extra) as server:
                answers = _answers(server.url, probe)
                reference = reference or answers
                agreement[mode] = _agreement(answers, reference)
                steps = asyncio.run(ladder(server.url, mode, mix, load, log))
            rows += steps
            best[mode], sustained[mode], first_p50[mode] = (
                best_qps(steps, load.p99_budget_ms),
                sustained_qps(steps),
                steps[0].p50_ms,
            )
            log(
                f"{mode}: max QPS at P99 <= {load.p99_budget_ms:.0f} ms {best[mode]:.0f}, sustained {sustained[mode]:.0f}, "
                f"top-k agreement with the single server {agreement[mode]:.3f}"
            )
    return {
        "machine": machine() | {"client": "aiohttp open loop, same machine as the servers"},
        "config": {
            "load": {k: v for k, v in asdict(load).items() if k != "snapshot_dir"},
            "shards": list(cfg.shards),
            "agreement_requests": cfg.agreement_requests,
        },
        "rows": [asdict(r) for r in rows],
        "p99_budget_ms": load.p99_budget_ms,
        "max_qps_at_p99_budget": best,
        "max_sustained_qps": sustained,
        "p50_ms_at_lowest_rate": first_p50,
        "agreement_with_single": agreement,
        "recall": recall,
    }


def format_table(result: dict) -> str:
    lines = [f"{'mode':<16} {'offered':>8} {'achieved':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"]
    lines += [
        f"{r['mode']:<16} {r['offered_qps']:>8.0f} {r['achieved_qps']:>9.1f} {r['p50_ms']:>8.1f} "
        f"{r['p99_ms']:>8.1f} {r['errors']:>7d}"
        for r in result["rows"]
    ]
    best, sustained = result["max_qps_at_p99_budget"], result["max_sustained_qps"]
    single = sustained.get("single") or 0.0
    for mode, qps in sustained.items():
        ratio = f" ({qps / single:.2f}x single)" if single else ""
        lines.append(
            f"{mode}: sustained {qps:.0f} QPS{ratio}, at P99 <= {result['p99_budget_ms']:.0f} ms {best[mode]:.0f}, "
            f"P50 {result['p50_ms_at_lowest_rate'][mode]:.0f} ms at {result['rows'][0]['offered_qps']:.0f}/s, "
            f"top-k agreement with single {result['agreement_with_single'][mode]:.3f}"
        )
    r = result["recall"]
    lines.append(
        f"single server's index recall@{r['k0']} {r['recall_at_k0']:.3f} (nprobe {r['nprobe']} of {r['nlist']})"
    )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="20,000 items and short steps (a few minutes)")
    p.add_argument("--items", type=int, help="catalogue size (default 1,000,000)")
    p.add_argument("--snapshots", help="directory to build the snapshot in and reuse it from")
    p.add_argument("--json", help="write the rows and the summary here")


def cli(args: argparse.Namespace) -> int:
    cfg = ShardsBenchConfig.quick() if args.quick else ShardsBenchConfig()
    if args.items:
        cfg = replace(cfg, load=replace(cfg.load, num_items=args.items))
    if args.snapshots:
        cfg = replace(cfg, snapshot_dir=Path(args.snapshots))
    result = run(cfg)
    print(format_table(result))
    write_json(args.json, result)
    return 0


BENCHMARK = Benchmark(
    "shards",
    "item-sharded serving on Ray Serve, 1 vs 2 shards, beside one process",
    add_arguments,
    cli,
)
