"""``sterling bench retrieval``: the quality table of SilverTorch's Table 3, in kind.

On each dataset: train the two-tower model and its OverArch (``sterling train`` defaults), publish,
and answer every held-out request (each user's last) over the whole catalogue, four ways:

* ``exact``: the primary task's query against the float item embeddings, brute force;
* ``int8_bloom``: the served model without OverArch: the index (int8 IVF + Bloom, exact filter check)
  ranked by inner product with the stored int8 vectors;
* ``overarch``: + OverArch over the merged per-task candidates, ranked by the primary task;
* ``overarch_vm``: + the Value Model over the task probabilities.

Recall@K counts the held-out request's engaged items (positives of the primary task) in the top K;
QPS is requests answered per second at the given batch size (model only, inputs prepared).

Ranking with the embedding cache: the same held-out requests each rank ``rank_candidates`` items
with :meth:`RetrievalModel.rank` (item state gathered from the cache) and by recomputing it (item
tower → rounding → OverArch item state), reporting both rates and whether the scores are identical.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from sterling.bench.ann import DEFAULT_MOVIELENS, machine
from sterling.bench.report import Benchmark, write_json
from sterling.data.batch import ItemCatalog, RequestBatch, RequestReader
from sterling.data.items import read_items
from sterling.data.movielens import load_movielens
from sterling.data.schema import DatasetPaths
from sterling.data.synth import SynthConfig, generate
from sterling.models.towers import ItemTerms
from sterling.retrieval.inputs import UserInputs
from sterling.retrieval.item_table import cache_rows
from sterling.retrieval.model import RetrievalModel
from sterling.retrieval.publish import load_model, publish
from sterling.train.checkpoint import load_checkpoint
from sterling.train.encode import encode_catalog
from sterling.train.loop import TrainConfig, train
from sterling.train.metrics import recall_at_k
from sterling.train.split import holdout_requests

__all__ = ["RetrievalBenchConfig", "ROWS", "run"]

ROWS = ("exact", "int8_bloom", "overarch", "overarch_vm")
KS = (20, 100, 200, 500)


@dataclass(frozen=True)
class RetrievalBenchConfig:
    """One benchmark run.

    Args:
        synth (SynthConfig): the synthetic dataset.
        train (TrainConfig): two-tower + OverArch training.
        k0 (int): candidates per task query.
        nprobe (int | None): lists probed (None: the index default).
        value_formula (str | None): the Value Model of the last row (None: a default over the tasks).
        batch (int): requests per forward.
        rank_candidates (int): items each request ranks in the cached-vs-recomputed comparison.
        seed (int): seed.
    """

    synth: SynthConfig = SynthConfig()
    train: TrainConfig = TrainConfig()
    k0: int = 1000
    nprobe: int | None = None
    value_formula: str | None = None
    batch: int = 64
    rank_candidates: int = 500
    seed: int = 0

    @classmethod
    def quick(cls) -> RetrievalBenchConfig:
        from sterling.train.overarch import OverArchTrainConfig

        return cls(
            synth=replace(SynthConfig(), num_users=300, num_items=1000),
            train=TrainConfig(epochs=1, overarch=OverArchTrainConfig(epochs=1)),
            k0=600,
            batch=32,
        )


def default_formula(tasks: tuple[str, ...]) -> str:
    """Weights halving per task after the first: ``click + 0.5*like + 0.25*share``."""
    return " + ".join(name if i == 0 else f"{0.5**i:g}*{name}" for i, name in enumerate(tasks))


def user_inputs(model: RetrievalModel, batch: RequestBatch, item_ids: np.ndarray) -> UserInputs:
    """The :class:`UserInputs` of a training batch's requests (catalogue rows → segment rows)."""
    feats = {**batch.context, **batch.user_features}
    columns = [feats.get(n, torch.zeros(batch.num_requests, dtype=torch.int64)) for n in model.config.features]
    features = torch.stack(columns, 1) if columns else torch.zeros(batch.num_requests, 0, dtype=torch.int64)
    return UserInputs(
        model.rows_of(torch.from_numpy(item_ids[batch.history_items.numpy()])),
        batch.history_actions,
        batch.history_offsets,
        features,
    )


def _held_out(
    data_dir: Path, model: RetrievalModel, item_ids: np.ndarray, max_history: int, primary: int, batch: int
) -> tuple[list[UserInputs], list[set[int]]]:
    """The held-out requests in batches of ``batch``, and each one's engaged item ids."""
    reader = RequestReader(data_dir, ItemCatalog(item_ids), max_history, token_budget=10**9)
    inputs, relevant = [], []
    for full in reader.batches(only=holdout_requests(DatasetPaths(data_dir).requests)):
        for lo in range(0, full.num_requests, batch):
            part = full.requests(lo, min(lo + batch, full.num_requests))
            inputs.append(user_inputs(model, part, item_ids))
            owner = part.impression_to_request().numpy()
            engaged = part.labels[:, primary].numpy() > 0
            ids = item_ids[part.item_rows.numpy()]
            relevant += [set(ids[engaged & (owner == r)].tolist()) for r in range(part.num_requests)]
    return inputs, relevant


def _timed(answer, inputs: list[UserInputs]) -> tuple[torch.Tensor, float]:
    """Every batch answered (ids ``[H, 500]``) and the requests per second (best of two passes)."""
    best, out = float("inf"), None
    for _ in range(2):
        t0 = time.perf_counter()
        out = [answer(x) for x in inputs]
        best = min(best, time.perf_counter() - t0)
    return torch.cat(out), sum(x.batch_size for x in inputs) / best


def _dataset_rows(data_dir: Path, name: str, cfg: RetrievalBenchConfig, work: Path, log) -> tuple[list[dict], dict]:
    report = train(data_dir, work / "checkpoint", cfg.train, log=lambda s: log(f"  {s}"))
    snapshot = publish(report.checkpoint, DatasetPaths(data_dir).items, work / "snapshot", k0=cfg.k0, nprobe=cfg.nprobe)
    model = load_model(snapshot)
    tasks = model.config.tasks
    formula = cfg.value_formula or default_formula(tasks)
    ckpt = load_checkpoint(report.checkpoint)
    item_ids, attributes, _ = read_items(DatasetPaths(data_dir).items)
    vectors = encode_catalog(ckpt.model, ItemTerms.build(attributes, vocab=ckpt.term_vocab), len(item_ids))
    primary = model.config.primary
    inputs, relevant = _held_out(data_dir, model, item_ids, model.config.max_history, primary, cfg.batch)
    kmax = max(KS)
    variants = {
        "int8_bloom": load_model(snapshot, use_overarch=False),
        "overarch": load_model(snapshot, value_formula=None),
        "overarch_vm": load_model(snapshot, value_formula=formula),
    }

    def exact(x: UserInputs) -> torch.Tensor:
        with torch.no_grad():
            _, queries = model.encode(x)
            top = torch.topk(queries[:, primary] @ vectors.T, min(kmax, len(item_ids)), dim=1).indices
        return torch.from_numpy(item_ids)[top]

    answers = {"exact": exact}
    answers |= {row: (lambda x, m=m: m(x, k=kmax).ids) for row, m in variants.items()}
    rows = []
    for row in ROWS:
        ranked, qps = _timed(answers[row], inputs)
        out = {
            "row": row,
            "dataset": name,
            "requests": len(relevant),
            "qps": qps,
            "value_formula": formula if row == "overarch_vm" else None,
        }
        out |= {f"recall@{k}": recall_at_k(ranked, relevant, k) for k in KS}
        log(f"  {name:<14} {row:<12} " + "  ".join(f"R@{k} {out[f'recall@{k}']:.4f}" for k in KS) + f"  {qps:,.0f} QPS")
        rows.append(out)
    ranking = _ranking(model, ckpt, ItemTerms.build(attributes, vocab=ckpt.term_vocab), inputs, cfg, name)
    log(
        f"  {name:<14} ranking {cfg.rank_candidates} items/request: cache {ranking['cached_qps']:,.0f} vs recompute "
        f"{ranking['recompute_qps']:,.0f} requests/s ({ranking['speedup']:.1f}x), identical scores: {ranking['identical']}"
    )
    return rows, ranking


def _ranking(
    model: RetrievalModel, ckpt, item_terms: ItemTerms, inputs: list[UserInputs], cfg: RetrievalBenchConfig, name: str
) -> dict:
    """The ranking entry point with the cache against recomputing the item side per request."""
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = model.index.ids
    n = len(ids)
    item_ids = [ids[torch.randint(n, (x.batch_size, cfg.rank_candidates), generator=gen)] for x in inputs]
    catalog = ItemCatalog(ckpt.item_ids)

    def recomputed(x: UserInputs, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            users, queries = model.encode(x)
            rows = torch.from_numpy(catalog.rows(ids.reshape(-1).numpy()))
            state = cache_rows(ckpt.model.encode_items(rows, item_terms), model.overarch, model.items.dtype)
            history, mask = model.history(x)
            logits = model.overarch(users, queries, history, mask, state.float().view(*ids.shape, -1))
        return torch.sigmoid(logits)

    timings, scores = {}, {}
    for label, fn in (("cached", model.rank), ("recompute", recomputed)):
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            out = [fn(x, ids) for x, ids in zip(inputs, item_ids)]
            best = min(best, time.perf_counter() - t0)
        timings[label], scores[label] = sum(x.batch_size for x in inputs) / best, torch.cat(out)
    diff = float((scores["cached"] - scores["recompute"]).abs().max())
    return {
        "dataset": name,
        "candidates_per_request": cfg.rank_candidates,
        "cached_qps": timings["cached"],
        "recompute_qps": timings["recompute"],
        "speedup": timings["cached"] / timings["recompute"],
        "identical": bool(torch.equal(scores["cached"], scores["recompute"])),
        "max_abs_diff": diff,
    }


def run(cfg: RetrievalBenchConfig, movielens: Path | None = None, log=print) -> dict:
    """Every row on the synthetic default (and on ``movielens`` when given)."""
    torch.manual_seed(cfg.seed)
    rows, ranking = [], []
    with tempfile.TemporaryDirectory(prefix="sterling-bench-retrieval-") as tmp:
        work = Path(tmp)
        log(f"synthetic default: {cfg.synth.num_users:,} users, {cfg.synth.num_items:,} items")
        datasets = [("synthetic", generate(cfg.synth, work / "synthetic" / "data"))]
        if movielens is not None:
            log(f"MovieLens: {movielens}")
            datasets.append((movielens.name, load_movielens(movielens, work / movielens.name / "data")))
        for name, data in datasets:
            found, ranked = _dataset_rows(data, name, cfg, work / name, log)
            rows += found
            ranking.append(ranked)
    return {"machine": machine(), "config": asdict(cfg), "rows": rows, "ranking": ranking}


def format_table(result: dict) -> str:
    head = f"{'dataset':<14} {'row':<12} " + " ".join(f"{'R@' + str(k):>8}" for k in KS) + f" {'QPS':>9}"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(
            f"{r['dataset']:<14} {r['row']:<12} "
            + " ".join(f"{r[f'recall@{k}']:>8.4f}" for k in KS)
            + f" {r['qps']:>9,.0f}"
        )
    lines += ["", f"{'dataset':<14} {'ranking: cached':>16} {'recomputed':>11} {'speed-up':>9} identical"]
    for r in result["ranking"]:
        lines.append(
            f"{r['dataset']:<14} {r['cached_qps']:>16,.0f} {r['recompute_qps']:>11,.0f} "
            f"{r['speedup']:>8.1f}x {r['identical']}"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a small synthetic run (smoke test)")
    p.add_argument(
        "--movielens",
        default=str(DEFAULT_MOVIELENS.parent / "ml-100k"),
        metavar="DIR",
        help="MovieLens directory ('none' to skip; default: %(default)s when present)",
    )
    p.add_argument("--json", metavar="PATH", help="write the result as JSON")


def cli(args: argparse.Namespace) -> int:
    cfg = RetrievalBenchConfig.quick() if args.quick else RetrievalBenchConfig()
    ml = None if args.movielens in (None, "none") or args.quick else Path(args.movielens)
    if ml is not None and not ml.is_dir():
        print(f"MovieLens data not found at {ml}; synthetic only")
        ml = None
    result = run(cfg, ml)
    print(format_table(result))
    write_json(args.json, result)
    return 0


BENCHMARK = Benchmark(
    "retrieval",
    "the quality table: exact, int8 + Bloom, + OverArch, + Value Model",
    add_arguments,
    cli,
)
