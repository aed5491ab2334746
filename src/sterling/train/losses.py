"""Losses of the two-tower model on a :class:`~sterling.data.batch.RequestBatch`.

* **Retrieval**, per task: sampled softmax. The user tower's per-task query
  (:meth:`~sterling.models.towers.TwoTower.task_queries`) scores the candidates; each impression
  with a positive label of that task is a target among the candidate set = the batch's distinct
  impressed items (in-batch negatives) plus uniform random items; candidates that the *same user* engaged with elsewhere in the batch are
  masked, so a user's other positives are never pushed down as negatives. Logits are corrected by
  the log of each candidate's expected count in the candidate set (logQ correction, Yi et al. 2019),
  so popular items are not under-scored for being frequent in-batch negatives. The loss is the
  mean over the positives of all tasks (weighting tasks equally instead let the few like / share
  positives swamp the clicks: docs/benchmarks.md).
* **Multi-task**: binary cross-entropy per task on every impression (``T`` heads).

The user tower runs once per request and its output is shared by all the request's impressions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sterling.data.batch import RequestBatch
from sterling.models.towers import ItemTerms, TwoTower

__all__ = ["TwoTowerLoss", "TwoTowerObjective", "two_tower_loss"]


@dataclass(frozen=True)
class TwoTowerLoss:
    """Loss terms of one batch (scalars)."""

    total: torch.Tensor
    retrieval: torch.Tensor
    tasks: torch.Tensor
    positives: int  # retrieval targets, all tasks


def two_tower_loss(
    model: TwoTower,
    batch: RequestBatch,
    item_terms: ItemTerms,
    num_negatives: int,
    item_frequency: torch.Tensor,
    generator: torch.Generator | None = None,
    shard: tuple[int, int] | None = None,
) -> TwoTowerLoss:
    """Sampled-softmax retrieval loss plus per-task BCE.

    Args:
        model (TwoTower): the model.
        batch (RequestBatch): ``R`` requests, ``K`` impressions.
        item_terms (ItemTerms): attribute terms of the whole catalogue.
        num_negatives (int): uniform random items added to the in-batch candidates.
        item_frequency (torch.Tensor): float ``[N]``, each item's share of all impressions (sums to 1).
        generator (torch.Generator | None): for the uniform negatives.
        shard (tuple[int, int] | None): requests ``lo:hi`` of the batch whose part of the loss to
            compute (data-parallel training: :mod:`sterling.train.distributed`). The candidate
            set, the logQ counts and the same-user mask still come from the whole batch; the user
            tower runs on the shard's requests only; each term is the shard's sum divided by the
            whole batch's count, so the shards' losses (and gradients) add up to the batch's.
    """
    cfg = model.cfg
    k, n = batch.num_impressions, num_negatives
    lo, hi = shard if shard is not None else (0, batch.num_requests)
    local = batch.requests(lo, hi)
    k0, k1 = int(batch.impression_offsets[lo]), int(batch.impression_offsets[hi])
    negatives = torch.randint(cfg.num_items, (n,), generator=generator)
    # One item-tower pass over every distinct item the step touches (impressions, negatives, history).
    rows, inverse = torch.unique(torch.cat([batch.item_rows, negatives, local.history_items]), return_inverse=True)
    vectors = model.encode_items(rows, item_terms)  # [U, D]
    slots, cand_inverse = torch.unique(inverse[: k + n], return_inverse=True)
    candidates, items = rows[slots], vectors[slots]  # [C], [C, D]
    impression_items = cand_inverse[:k]  # [K]
    users = model.encode_users(
        vectors[inverse[k + n :]],
        local.history_actions,
        local.history_offsets,
        {**local.context, **local.user_features},
    )  # [R', D] the shard's requests
    request = batch.impression_to_request()  # [K]
    mine = request[k0:k1] - lo  # [K'] row of users

    logits = model.task_logits(users[mine], items[impression_items[k0:k1]])  # [K', T]
    task_loss = F.binary_cross_entropy_with_logits(logits, local.labels, reduction="sum") / (k * len(cfg.tasks))

    queries = model.task_queries(users)  # [R', T, D]
    _, user_slot = torch.unique(batch.user_ids, return_inverse=True)  # [R]
    expected = (k * item_frequency[candidates] + n / cfg.num_items).log()  # [C] logQ
    per_task, n_pos = [], 0
    for t in range(len(cfg.tasks)):
        positive = batch.labels[:, t] > 0  # [K]
        n_pos += int(positive.sum())
        engaged = torch.zeros(len(batch.user_ids), items.shape[0], dtype=torch.bool)
        engaged[user_slot[request[positive]], impression_items[positive]] = True  # every user's positives
        positive = positive[k0:k1]
        if not bool(positive.any()):
            continue
        target, owner = impression_items[k0:k1][positive], mine[positive]  # [P], [P]
        scores = queries[owner, t] @ items.T / cfg.temperature - expected  # [P, C]
        other = engaged[user_slot[owner + lo]]  # [P, C]
        other[torch.arange(len(target)), target] = False
        per_task.append(F.cross_entropy(scores.masked_fill(other, float("-inf")), target, reduction="sum"))
    # With no positive in this shard the queries still enter the graph (times 0): DDP expects every
    # parameter to receive a gradient on every rank.
    retrieval = torch.stack(per_task).sum() / n_pos if per_task else 0.0 * queries.sum()
    return TwoTowerLoss(total=retrieval + task_loss, retrieval=retrieval, tasks=task_loss, positives=n_pos)


class TwoTowerObjective(torch.nn.Module):
    """:func:`two_tower_loss` as a module's forward, so that DDP (which hooks ``forward``) can wrap
    it: ``forward`` returns the loss terms ``(total, retrieval, tasks)``."""

    def __init__(self, model: TwoTower) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        batch: RequestBatch,
        item_terms: ItemTerms,
        num_negatives: int,
        item_frequency: torch.Tensor,
        generator: torch.Generator | None = None,
        shard: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss = two_tower_loss(self.model, batch, item_terms, num_negatives, item_frequency, generator, shard)
        return loss.total, loss.retrieval, loss.tasks
