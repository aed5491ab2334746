"""``sterling bench roo``: request-only (ROO) training against impression-level training of the
same model, in one run.

Arms (spec ``roo.md`` §7.4), each trained in its own spawned process (so ``peak_rss_mb`` is that
arm's own peak) on the same held-out split:

* ``impression``: the HSTU ranker in impression mode, one sequence ``[history ‖ impression]`` per
  impression, for ``impressions`` training impressions.
* ``roo``: the same model, same batches, same number of impressions, in ROO mode: one sequence
  ``[history ‖ k impressions]`` per request. Same gradients (``tests/models/test_ranker.py``), so
  its NE should match the impression arm's and its throughput should be about ``k`` times higher.
* ``roo_scaled``: ROO's saved time spent on a deeper, wider user model, trained for the impression
  arm's wall-clock time (so about as many passes as fit), to see whether the compute buys quality.

Storage: the zstd Parquet bytes per impression of both formats of the same data
(:func:`sterling.data.stats.dataset_stats`: request format = requests + users tables). A row's
``bytes_per_impression`` is its format's: the impression arm's is the impression log in time order
(as a server writes it); ``bytes_per_impression_user_order`` is the same rows sorted by user, which
lets zstd find a user's repeated histories (spec ``roo.md`` §2.4's "physical" de-duplication).

Data: the synthetic default (:mod:`sterling.data.synth` with requests of 20-50 impressions and
histories of 200-400 events, the regime of the issue), and MovieLens pseudo-requests
(:mod:`sterling.data.movielens`: a user's ratings within a window form one request) when present.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from sterling.bench.ann import DEFAULT_MOVIELENS, machine
from sterling.bench.report import Benchmark, write_json
from sterling.data.movielens import load_movielens
from sterling.data.stats import dataset_stats
from sterling.data.synth import SynthConfig, generate
from sterling.train.ranking import RankingConfig, train_ranker

__all__ = ["RooBenchConfig", "run"]

ARMS = ("impression", "roo", "roo_scaled")


@dataclass(frozen=True)
class RooBenchConfig:
    """Sizes of one benchmark run.

    Args:
        users (int), items (int): synthetic population.
        requests_per_user, impressions_per_request, history_length (tuple[int, int]): synthetic ranges.
        median_impressions (float): median impressions per request.
        max_history (int): history events per request the model reads.
        impressions (int): training impressions of the ``impression`` and ``roo`` arms.
        token_budget (int): history events + impressions per step.
        dim (int), layers (int): the HSTU ranker of the first two arms.
        scaled_dim (int), scaled_layers (int): the ``roo_scaled`` arm's model.
        movielens_impressions (int): training impressions per arm on MovieLens.
        seed (int): data and parameter seed.
    """

    users: int = 1500
    items: int = 5000
    requests_per_user: tuple[int, int] = (4, 12)
    impressions_per_request: tuple[int, int] = (20, 50)
    median_impressions: float = 28.0
    history_length: tuple[int, int] = (200, 400)
    max_history: int = 200
    impressions: int = 20_000
    token_budget: int = 8192
    dim: int = 64
    layers: int = 2
    scaled_dim: int = 128
    scaled_layers: int = 4
    movielens_impressions: int = 6_000
    seed: int = 0

    @classmethod
    def quick(cls) -> RooBenchConfig:
        return cls(
            users=150,
            items=2000,
            requests_per_user=(3, 6),
            history_length=(100, 200),
            max_history=100,
            impressions=2_500,
            scaled_dim=64,
            scaled_layers=3,
            movielens_impressions=800,
        )


def _train_arm(data_dir: str, cfg: dict) -> dict:
    """Run in a spawned process: one arm's training and evaluation."""
    return asdict(train_ranker(Path(data_dir), RankingConfig(**cfg), log=lambda s: None))


def _in_process(data_dir: Path, cfg: dict) -> dict:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_train_arm, str(data_dir), cfg).result()


def _arms(data_dir: Path, dataset: str, bench: RooBenchConfig, impressions: int, storage: dict, log) -> list[dict]:
    base = {
        "encoder": "hstu",
        "dim": bench.dim,
        "num_layers": bench.layers,
        "max_history": bench.max_history,
        "token_budget": bench.token_budget,
        "max_impressions": impressions,
        "epochs": 100,
        "seed": bench.seed,
    }
    reports = {}
    for arm in ("impression", "roo"):
        reports[arm] = _in_process(data_dir, {**base, "mode": arm})
        log(
            f"{dataset:<14} {arm:<11} {reports[arm]['impressions_per_s']:>9,.0f} impressions/s  "
            f"NE {reports[arm]['ne']}  peak {reports[arm]['peak_rss_mb']:,.0f} MiB"
        )
    scaled = {
        **base,
        "mode": "roo",
        "dim": bench.scaled_dim,
        "num_layers": bench.scaled_layers,
        "max_impressions": None,
        "max_seconds": reports["impression"]["train_s"],
    }
    reports["roo_scaled"] = _in_process(data_dir, scaled)
    log(
        f"{dataset:<14} {'roo_scaled':<11} {reports['roo_scaled']['impressions_per_s']:>9,.0f} impressions/s  "
        f"NE {reports['roo_scaled']['ne']}  ({reports['roo_scaled']['impressions']:,} impressions)"
    )
    rows = []
    for arm in ARMS:
        r = reports[arm]
        fmt = "impressions_time_order" if arm == "impression" else "requests_format"
        rows.append(
            {
                "arm": arm,
                "dataset": dataset,
                "impressions_per_request": r["mean_impressions_per_request"],
                "history_len": r["mean_history_len"],
                "impressions_per_s": r["impressions_per_s"],
                "peak_rss_mb": r["peak_rss_mb"],
                "bytes_per_impression": storage["bytes_per_impression"][fmt],
                **(
                    {"bytes_per_impression_user_order": storage["bytes_per_impression"]["impressions_user_order"]}
                    if arm == "impression"
                    else {}
                ),
                "auc": r["auc"],
                "ne": r["ne"],
                "gauc": r["gauc"],
                "train_s": r["train_s"],
                "impressions": r["impressions"],
                "steps": r["steps"],
                "model": {k: r["config"][k] for k in ("encoder", "dim", "num_layers", "max_history")},
            }
        )
    return rows


def _summary(rows: list[dict]) -> dict:
    """Per dataset: ROO's speed-up over impression mode, the relative NE gap per task and the
    storage ratio."""
    out = {}
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        arm = {r["arm"]: r for r in rows if r["dataset"] == dataset}
        imp, roo = arm["impression"], arm["roo"]
        out[dataset] = {
            "speedup": roo["impressions_per_s"] / imp["impressions_per_s"],
            "ne_relative_gap": {t: abs(roo["ne"][t] - imp["ne"][t]) / imp["ne"][t] for t in imp["ne"]},
            "storage_ratio": imp["bytes_per_impression"] / roo["bytes_per_impression"],
            "storage_ratio_user_order": imp["bytes_per_impression_user_order"] / roo["bytes_per_impression"],
            "scaled_ne_change": {t: arm["roo_scaled"]["ne"][t] / imp["ne"][t] - 1 for t in imp["ne"]},
        }
    return out


def run(bench: RooBenchConfig, movielens: Path | None = None, log=print) -> dict:
    """Generate the synthetic data (and convert MovieLens), run the arms, return the result."""
    rows, storage = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        synth = generate(
            SynthConfig(
                seed=bench.seed,
                num_users=bench.users,
                num_items=bench.items,
                requests_per_user=bench.requests_per_user,
                impressions_per_request=bench.impressions_per_request,
                median_impressions=bench.median_impressions,
                history_length=bench.history_length,
            ),
            Path(tmp) / "synthetic",
        )
        sources = [("synthetic", synth, bench.impressions)]
        if movielens is not None:
            sources.append(
                (
                    f"movielens:{movielens.name}",
                    load_movielens(movielens, Path(tmp) / "movielens"),
                    bench.movielens_impressions,
                )
            )
        for dataset, path, impressions in sources:
            storage[dataset] = dataset_stats(path)
            per = storage[dataset]["bytes_per_impression"]
            ratio = storage[dataset]["ratio"]
            log(
                f"{dataset:<14} storage: request format {per['requests_format']:.1f} B/impression, impression format "
                f"{per['impressions_time_order']:.1f} B/impression in time order ({ratio['time']:.1f}x), "
                f"{per['impressions_user_order']:.1f} sorted by user ({ratio['user']:.1f}x)"
            )
            rows += _arms(path, dataset, bench, impressions, storage[dataset], log)
    return {"machine": machine(), "config": asdict(bench), "rows": rows, "storage": storage, "summary": _summary(rows)}


def format_table(result: dict) -> str:
    head = (
        f"{'dataset':<22} {'arm':<11} {'k/req':>6} {'hist':>6} {'impr/s':>9} {'peak MiB':>9} {'B/impr':>8}  NE per task"
    )
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        ne = " ".join(f"{t} {v:.4f}" for t, v in r["ne"].items())
        lines.append(
            f"{r['dataset'][:22]:<22} {r['arm']:<11} {r['impressions_per_request']:>6.1f} {r['history_len']:>6.0f} "
            f"{r['impressions_per_s']:>9,.0f} {r['peak_rss_mb']:>9,.0f} {r['bytes_per_impression']:>8.1f}  {ne}"
        )
    for dataset, s in result["summary"].items():
        gaps = ", ".join(f"{t} {100 * g:.2f}%" for t, g in s["ne_relative_gap"].items())
        lines.append(
            f"{dataset}: ROO {s['speedup']:.1f}x impression mode; NE gap {gaps}; storage {s['storage_ratio']:.1f}x smaller "
            f"({s['storage_ratio_user_order']:.1f}x against impression rows sorted by user)"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a small dataset and budget (about a minute)")
    p.add_argument("--json", dest="json_path", help="write the rows, storage, summary and machine here")
    p.add_argument("--impressions", type=int, help="training impressions of the impression and roo arms")
    p.add_argument(
        "--movielens",
        type=Path,
        default=None,
        help=f"MovieLens folder (default {DEFAULT_MOVIELENS} when present; 'none' to skip)",
    )


def cli(args: argparse.Namespace) -> int:
    bench = RooBenchConfig.quick() if args.quick else RooBenchConfig()
    if args.impressions:
        bench = replace(bench, impressions=args.impressions)
    movielens = args.movielens
    if movielens is None and DEFAULT_MOVIELENS.is_dir():
        movielens = DEFAULT_MOVIELENS
    result = run(bench, None if movielens is None or str(movielens) == "none" else movielens)
    print(format_table(result))
    write_json(args.json_path, result)
    return 0


BENCHMARK = Benchmark(
    "roo",
    "ROO vs impression-level training of one HSTU ranker: speed, memory, NE, storage",
    add_arguments,
    cli,
)
