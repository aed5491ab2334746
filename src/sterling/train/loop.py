"""Training loop of the thin two-tower model on request-level (ROO) data, with a held-out
evaluation and a checkpoint (:mod:`sterling.train.checkpoint`).

Split: each user's last request (users with at least two requests) is held out
(:mod:`sterling.train.split`); the model trains on the rest. Evaluation is full-catalogue: the
held-out request's user embedding searches every item (exact, through :class:`~sterling.ItemIndex`),
and recall@k counts the request's engaged items found, beside a most-popular baseline. AUC per task is computed on the held-out impressions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sterling.data.batch import ItemCatalog, RequestBatch, RequestReader
from sterling.data.items import read_items
from sterling.data.schema import DatasetPaths, read_roles
from sterling.index.item_index import ItemIndex
from sterling.models.towers import ItemTerms, TwoTower, TwoTowerConfig
from sterling.train.checkpoint import write_checkpoint
from sterling.train.distributed import rank_and_world, run_ranks, shard_bounds
from sterling.train.encode import encode_catalog, encode_requests
from sterling.train.losses import TwoTowerObjective
from sterling.train.metrics import auc, recall_at_k
from sterling.train.overarch import OverArchTrainConfig, train_overarch
from sterling.train.split import holdout_requests

__all__ = ["TrainConfig", "TrainReport", "train", "train_distributed"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and model sizes.

    Args:
        epochs (int): passes over the training requests.
        lr (float): Adam learning rate.
        token_budget (int): history events + impressions per batch.
        max_history (int): most recent history events per request.
        num_negatives (int): uniform negatives per batch in the retrieval loss.
        dim (int): embedding width.
        hidden (int): tower hidden width.
        retrieval_task (str | None): label whose positives are retrieval targets (default: the first).
        eval_ks (tuple[int, ...]): recall cut-offs.
        max_steps (int | None): stop after this many steps (for smoke runs).
        seed (int): seed of parameters and negatives.
        overarch (OverArchTrainConfig | None): the second stage, an OverArch over the frozen towers
            (None: no OverArch; serving ranks by inner product).
    """

    epochs: int = 5
    lr: float = 3e-3
    token_budget: int = 16384
    max_history: int = 100
    num_negatives: int = 512
    dim: int = 64
    hidden: int = 128
    retrieval_task: str | None = None
    eval_ks: tuple[int, ...] = (10, 50)
    max_steps: int | None = None
    seed: int = 0
    overarch: OverArchTrainConfig | None = field(default_factory=OverArchTrainConfig)


@dataclass(frozen=True)
class TrainReport:
    """What a run produced: the checkpoint and its held-out metrics."""

    checkpoint: Path
    steps: int
    train_s: float
    impressions_per_s: float
    metrics: dict = field(default_factory=dict)


def train(
    data_dir: Path, out_dir: Path, cfg: TrainConfig = TrainConfig(), log: Callable[[str], None] = print
) -> TrainReport:
    """Train on ``data_dir`` (request format), evaluate on the held-out requests, write a checkpoint
    to ``out_dir``. Inside a torch.distributed process group (:func:`train_distributed`) each rank
    trains on its share of every batch's requests, and rank 0 alone evaluates, trains the OverArch
    stage and writes the checkpoint."""
    rank, world = rank_and_world()
    if rank != 0:
        log = _silent
    torch.manual_seed(cfg.seed)
    paths = DatasetPaths(Path(data_dir))
    item_ids, attributes, _ = read_items(paths.items)
    catalog = ItemCatalog(item_ids)
    item_terms = ItemTerms.build(attributes)
    roles = read_roles(pq.read_schema(paths.requests))
    tasks = tuple(roles.labels)
    retrieval_task = tasks.index(cfg.retrieval_task) if cfg.retrieval_task else 0
    model_cfg = TwoTowerConfig(
        num_items=len(catalog),
        num_terms=len(item_terms.vocab),
        tasks=tasks,
        context_features=tuple(roles.context),
        user_features=tuple(roles.user),
        dim=cfg.dim,
        hidden=cfg.hidden,
        max_history=cfg.max_history,
    )
    model = TwoTower(model_cfg)
    reader = RequestReader(paths.root, catalog, cfg.max_history, cfg.token_budget)
    holdout = holdout_requests(paths.requests)
    log(f"train: {len(catalog):,} items, tasks {', '.join(tasks)}, {len(holdout):,} held-out requests")

    frequency, engagements = item_counts(reader, holdout, len(catalog), retrieval_task)
    step = TwoTowerObjective(model)
    if world > 1:  # each rank computes its share of every batch's requests (sterling.train.distributed)
        step = DistributedDataParallel(step)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps, seen, t0 = 0, 0, time.perf_counter()
    for epoch in range(cfg.epochs):
        total, n = torch.zeros(()), 0
        for batch in reader.batches(exclude=holdout):
            opt.zero_grad(set_to_none=True)
            loss = backward_step(step, batch, item_terms, cfg.num_negatives, frequency, gen)
            opt.step()
            steps, seen, n, total = steps + 1, seen + batch.num_impressions, n + 1, total + loss
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                break
        if world > 1:
            dist.all_reduce(total)
        elapsed = time.perf_counter() - t0
        log(
            f"  epoch {epoch + 1}/{cfg.epochs}: loss {float(total) / max(n, 1):.4f}, {steps} steps, "
            f"{seen / elapsed:,.0f} impressions/s, {elapsed:.1f}s"
        )
        if cfg.max_steps is not None and steps >= cfg.max_steps:
            break
    train_s = time.perf_counter() - t0
    if rank != 0:  # rank 0 evaluates, trains the OverArch stage and writes the checkpoint
        return TrainReport(Path(out_dir), steps, train_s, seen / max(train_s, 1e-9))

    model.eval()
    metrics = evaluate(
        model, reader, holdout, catalog, attributes, item_terms, cfg.eval_ks, retrieval_task, engagements
    )
    for name, value in metrics.items():
        log(f"  {name}: {value:.4f}")
    arch = None
    if cfg.overarch is not None:
        vectors = encode_catalog(model, item_terms, len(catalog))
        arch = train_overarch(model, reader, vectors, holdout, cfg.overarch, retrieval_task, log)
    run = {"train": asdict(cfg), "data_dir": str(Path(data_dir).resolve()), "metrics": metrics}
    path = write_checkpoint(Path(out_dir), model, item_ids, item_terms, arch, run)
    return TrainReport(path, steps, train_s, seen / max(train_s, 1e-9), metrics)


def train_distributed(
    data_dir: Path, out_dir: Path, cfg: TrainConfig, nproc: int, log: Callable[[str], None] = print
) -> TrainReport:
    """:func:`train` on ``nproc`` processes (:func:`sterling.train.distributed.run_ranks`); rank 0
    evaluates, writes the checkpoint and returns the report (the other ranks log nothing)."""
    return run_ranks(train, (Path(data_dir), Path(out_dir), cfg, log), nproc)


def backward_step(
    objective: TwoTowerObjective | DistributedDataParallel,
    batch: RequestBatch,
    item_terms: ItemTerms,
    num_negatives: int,
    frequency: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Forward and backward of one batch; returns this rank's part of the loss (a scalar).

    In a process group, ``objective`` is DDP-wrapped and this rank computes its share of the
    batch's requests (:func:`~sterling.train.distributed.shard_bounds`); DDP averages the ranks'
    gradients, so each rank back-propagates ``world ×`` its part and the gradient left in the
    parameters is the whole batch's."""
    rank, world = rank_and_world()
    tokens = (batch.history_offsets.diff() + batch.impression_offsets.diff()).numpy()
    loss, _, _ = objective(batch, item_terms, num_negatives, frequency, generator, shard_bounds(tokens, rank, world))
    (loss * world).backward()
    return loss.detach()


def _silent(message: str) -> None:
    """The log of ranks other than 0."""


def item_counts(
    reader: RequestReader, holdout: np.ndarray, num_items: int, retrieval_task: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over the training requests: each item's share ``float [N]`` of the impressions (a
    floor of one impression; the logQ correction) and its count of engagements ``float [N]`` (the
    most-popular baseline)."""
    impressions, engagements = torch.ones(num_items), torch.zeros(num_items)
    for batch in reader.batches(exclude=holdout):
        impressions += torch.bincount(batch.item_rows, minlength=num_items)
        engagements.index_add_(0, batch.item_rows, batch.labels[:, retrieval_task])
    return impressions / impressions.sum(), engagements


@torch.no_grad()
def evaluate(
    model: TwoTower,
    reader: RequestReader,
    holdout: np.ndarray,
    catalog: ItemCatalog,
    attributes: list[dict],
    item_terms: ItemTerms,
    ks: tuple[int, ...],
    retrieval_task: int,
    engagements: torch.Tensor,
) -> dict:
    """Full-catalogue recall@k (model and the most-engaged items of ``engagements [N]`` as
    baseline) and AUC per task on ``holdout``."""
    vectors = encode_catalog(model, item_terms, len(catalog))
    index = ItemIndex.build(vectors, attributes, ids=catalog.item_ids)
    kmax = max(ks)
    popular = torch.from_numpy(catalog.item_ids)[torch.topk(engagements, min(kmax, len(catalog))).indices]
    retrieved, relevant, scores, labels = [], [], [], []
    for batch in reader.batches(only=holdout):
        users = encode_requests(model, batch, vectors)
        retrieved.append(index.search(model.task_queries(users)[:, retrieval_task], k=kmax).ids)
        req = batch.impression_to_request()
        scores.append(model.task_logits(users[req], vectors[batch.item_rows]))
        labels.append(batch.labels)
        ids = catalog.item_ids[batch.item_rows.numpy()]
        pos = batch.labels[:, retrieval_task].numpy() > 0
        owner = req.numpy()
        relevant += [set(ids[pos & (owner == r)].tolist()) for r in range(batch.num_requests)]
    if not relevant:
        return {}
    ranked = torch.cat(retrieved)
    metrics = {}
    for k in ks:
        metrics[f"recall@{k}"] = recall_at_k(ranked, relevant, k)
        metrics[f"recall@{k}_popular"] = recall_at_k(popular.expand(len(relevant), -1), relevant, k)
    s, y = torch.cat(scores), torch.cat(labels)
    for t, name in enumerate(model.cfg.tasks):
        metrics[f"auc_{name}"] = auc(s[:, t], y[:, t])
    return metrics
