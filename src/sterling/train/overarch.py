"""OverArch training on request rows: the second stage after the two-tower model.

The towers are frozen. The item side is read exactly as serving reads it: the item tower's outputs
rounded to the snapshot's cache dtype (:func:`cached_embeddings`). Per training request the
candidates are its impressions (with their labels) plus ``retrieved_negatives`` items drawn
uniformly from the top ``negative_pool`` items the request's primary-task query retrieves from the
whole catalogue (impressed items excluded; label 0 on every task), i.e. from what the ANN hands
OverArch at serving. The loss (:func:`overarch_loss`) is binary cross-entropy per task over all
candidates (calibrated task probabilities for the Value Model) plus a listwise softmax of each
task's positives against the retrieved negatives (the ranking itself).

Measured on the synthetic default (``docs/benchmarks.md``): taking the very top retrieved items as
negatives teaches OverArch that a high retrieval score means "not engaged" (recall@20 fell below the
dot product's); BCE alone leaves the ANN order nearly unchanged.

Shapes: ``R`` requests, ``N`` items, ``D`` width, ``T`` tasks, ``M`` candidates per request (padded).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sterling.data.batch import RequestBatch, RequestReader
from sterling.models import jagged
from sterling.models.overarch import OverArch, OverArchConfig, make_overarch
from sterling.models.towers import TwoTower

__all__ = [
    "OverArchTrainConfig",
    "cached_embeddings",
    "listwise_loss",
    "overarch_inputs",
    "overarch_loss",
    "train_overarch",
]


@dataclass(frozen=True)
class OverArchTrainConfig:
    """Stage-2 training of an OverArch.

    Args:
        kind (str): "mol" or "mlp".
        epochs (int): passes over the training requests.
        lr (float): Adam learning rate.
        retrieved_negatives (int): catalogue items retrieved per request as extra negatives.
        negative_pool (int): the retrieved items (top by the primary query) they are drawn from;
            match it to serving's K0.
        hidden, components, component_dim (int): :class:`~sterling.models.overarch.OverArchConfig`.
        cache_dtype (str): dtype of the cached item embeddings ("float16" or "bfloat16").
        max_steps (int | None): stop after this many steps.
        seed (int): parameter seed.
    """

    kind: str = "mol"
    epochs: int = 3
    lr: float = 2e-3
    retrieved_negatives: int = 32
    negative_pool: int = 1000
    hidden: int = 128
    components: int = 4
    component_dim: int = 32
    cache_dtype: str = "float16"
    max_steps: int | None = None
    seed: int = 0


def cached_embeddings(vectors: torch.Tensor, dtype: str) -> torch.Tensor:
    """The item embeddings serving reads ``float32 [N, D]``: ``vectors`` rounded to ``dtype``."""
    if dtype not in ("float16", "bfloat16"):
        raise ValueError(f"cache dtype must be 'float16' or 'bfloat16', got {dtype!r}")
    return vectors.to(getattr(torch, dtype)).float()


def overarch_inputs(
    model: TwoTower, batch: RequestBatch, items: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The user side of a batch: user embeddings ``[R, D]``, task queries ``[R, T, D]``, the padded
    history's cached embeddings ``[R, L, D]`` and its mask bool ``[R, L]`` (``items [N, D]``)."""
    users = model.encode_users(
        items[batch.history_items],
        batch.history_actions,
        batch.history_offsets,
        {**batch.context, **batch.user_features},
    )
    history = jagged.to_padded(items[batch.history_items], batch.history_offsets)
    mask = jagged.to_padded(torch.ones_like(batch.history_items, dtype=torch.bool), batch.history_offsets)
    return users, model.task_queries(users), history, mask


def _candidates(
    batch: RequestBatch,
    queries: torch.Tensor,
    items: torch.Tensor,
    negatives: int,
    pool: int,
    primary: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidate rows int64 ``[R, M]``, labels ``[R, M, T]`` and valid mask ``[R, M]``: each request's
    impressions, then ``negatives`` un-impressed items drawn from its top ``pool`` by the primary
    query."""
    r, t = batch.num_requests, batch.labels.shape[1]
    imp_rows = jagged.to_padded(batch.item_rows, batch.impression_offsets)  # [R, K]
    imp_valid = jagged.to_padded(torch.ones_like(batch.item_rows, dtype=torch.bool), batch.impression_offsets)
    imp_labels = jagged.to_padded(batch.labels, batch.impression_offsets)  # [R, K, T]
    scores = queries[:, primary] @ items.T  # [R, N]
    scores[batch.impression_to_request(), batch.item_rows] = float("-inf")
    top = torch.topk(scores, min(pool, items.shape[0]), dim=1)  # [R, pool]
    u = torch.rand(r, negatives, generator=generator)  # uniform ranks
    pick = (u * top.indices.shape[1]).long()  # [R, neg]
    neg_rows = top.indices.gather(1, pick)
    neg_valid = torch.isfinite(top.values.gather(1, pick))
    rows = torch.cat([imp_rows, neg_rows], 1)
    labels = torch.cat([imp_labels, imp_labels.new_zeros(r, negatives, t)], 1)
    return rows, labels, torch.cat([imp_valid, neg_valid], 1)


def overarch_loss(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, impressions: int) -> torch.Tensor:
    """Per-task BCE over every valid candidate plus the listwise loss (``logits`` and ``labels``
    ``[R, M, T]``, ``valid`` bool ``[R, M]``; the first ``impressions`` columns are impressions, the
    rest retrieved negatives)."""
    bce = F.binary_cross_entropy_with_logits(logits[valid], labels[valid])
    return bce + listwise_loss(logits, labels, valid, impressions)


def listwise_loss(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, impressions: int) -> torch.Tensor:
    """Softmax cross-entropy of each positive against the retrieved negatives of its request (the
    ranking OverArch is asked for at serving: engaged items above the other ANN candidates); other
    positives and the unengaged impressions are left out. The mean over the positives of all tasks."""
    total, count = logits.new_zeros(()), 0
    retrieved = torch.zeros_like(valid)
    retrieved[:, impressions:] = valid[:, impressions:]
    for t in range(logits.shape[2]):
        positive = (labels[..., t] > 0) & valid  # [R, M]
        r, m = torch.nonzero(positive, as_tuple=True)  # [P]
        if not len(r):
            continue
        keep = retrieved[r] & ~positive[r]  # [P, M]
        keep[torch.arange(len(r)), m] = True
        total = total + F.cross_entropy(logits[r, :, t].masked_fill(~keep, float("-inf")), m, reduction="sum")
        count += len(r)
    return total / max(count, 1)


def train_overarch(
    model: TwoTower,
    reader: RequestReader,
    vectors: torch.Tensor,
    exclude,
    cfg: OverArchTrainConfig = OverArchTrainConfig(),
    primary: int = 0,
    log: Callable[[str], None] = print,
) -> OverArch:
    """Train an OverArch over the frozen ``model`` on the reader's requests (but ``exclude``).

    Args:
        model (TwoTower): trained towers (frozen here).
        reader (RequestReader): the training data.
        vectors (torch.Tensor): float ``[N, D]`` item tower outputs of the catalogue.
        exclude: request ids held out.
        cfg (OverArchTrainConfig): the stage's settings.
        primary (int): the task whose query retrieves the negatives.
        log: progress lines.
    """
    torch.manual_seed(cfg.seed)
    items = cached_embeddings(vectors, cfg.cache_dtype)
    arch = make_overarch(
        OverArchConfig(
            kind=cfg.kind,
            dim=items.shape[1],
            num_tasks=len(model.cfg.tasks),
            hidden=cfg.hidden,
            components=cfg.components,
            component_dim=cfg.component_dim,
        )
    )
    opt = torch.optim.Adam(arch.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps, t0 = 0, time.perf_counter()
    for epoch in range(cfg.epochs):
        total, n = 0.0, 0
        for batch in reader.batches(exclude=exclude):
            with torch.no_grad():
                users, queries, history, mask = overarch_inputs(model, batch, items)
                rows, labels, valid = _candidates(
                    batch, queries, items, cfg.retrieved_negatives, cfg.negative_pool, primary, gen
                )
            logits = arch(users, queries, history, mask, arch.item_state(items[rows]))  # [R, M, T]
            loss = overarch_loss(logits, labels, valid, impressions=rows.shape[1] - cfg.retrieved_negatives)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps, n, total = steps + 1, n + 1, total + loss.item()
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                break
        log(
            f"  overarch ({cfg.kind}) epoch {epoch + 1}/{cfg.epochs}: loss {total / max(n, 1):.4f}, "
            f"{steps} steps, {time.perf_counter() - t0:.1f}s"
        )
        if cfg.max_steps is not None and steps >= cfg.max_steps:
            break
    arch.eval()
    return arch
