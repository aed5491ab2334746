"""The ranking end of the served model: candidates in, top-k out.

``B`` requests with ``T`` task queries each bring ``T`` lists of ``K0`` candidates; they are merged
per request in id order (so the same candidates meet the scorer in the same order however they were
found, from one index or from shards), duplicates dropped (``M = T·K0`` slots), scored per task,
turned into one ranking score by the Value Model and cut to the top ``k``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from sterling.models.value_model import ValueModel

__all__ = ["Candidates", "Retrieved", "Trace", "ValueModels", "merge_candidates", "top_k"]

_BIG = 3.0e38  # the ranking key of +inf (and -_BIG of NaN and -inf): finite, inside float32


@dataclass(frozen=True)
class Candidates:
    """The filtered top-K0 of ``Q`` task queries, from one index, one shard or merged shards.

    Args:
        ids (torch.Tensor): int64 ``[Q, K0]``, -1 where fewer pass.
        scores (torch.Tensor): float32 ``[Q, K0]``, descending, -inf where ids is -1.
        state (torch.Tensor): float32 ``[Q, K0, S]``, each candidate's item state
            (:meth:`sterling.retrieval.item_table.ItemTable.state`; 0 where ids is -1).
    """

    ids: torch.Tensor
    scores: torch.Tensor
    state: torch.Tensor


@dataclass(frozen=True)
class Retrieved:
    """The answer for ``B`` requests.

    Attributes:
        ids (torch.Tensor): int64 ``[B, k]`` external item ids, -1 past the passing items.
        scores (torch.Tensor): float32 ``[B, k]`` ranking scores (Value Model, or the primary task's),
            descending, -inf where ids is -1.
        task_scores (torch.Tensor): float32 ``[B, k, T]``: OverArch probabilities per task (inner
            products without an OverArch).
    """

    ids: torch.Tensor
    scores: torch.Tensor
    task_scores: torch.Tensor

    @classmethod
    def empty(cls, k: int, tasks: int) -> Retrieved:
        """The answer to no requests: ``[0, k]`` ids and scores, ``[0, k, T]`` task scores."""
        return cls(torch.zeros(0, k, dtype=torch.int64), torch.zeros(0, k), torch.zeros(0, k, tasks))


@dataclass
class Trace:
    """What one forward spent, for metrics: seconds per stage (``user_tower``; ``ann``, the index's
    whole filtered search: plan, Bloom mask, int8 scan, exact check; ``overarch`` or ``ranker``, the
    scoring stage; ``value_model``)
    and the candidates each request kept after the filter and the merge (int64 ``[B]``)."""

    seconds: dict[str, float] = field(default_factory=dict)
    candidates: torch.Tensor | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class ValueModels:
    """The ranking score of per-task scores: the configured Value Model, a request's own formula
    (compiled once and cached), or the primary task's score when there is none."""

    def __init__(self, formula: str | None, tasks: tuple[str, ...], primary: int) -> None:
        self.tasks = tasks
        self.primary = primary
        self.configured = None if formula is None else ValueModel(formula, tasks)
        self._by_formula: dict[str, ValueModel] = {}

    def __call__(self, task_scores: torch.Tensor, formula: str | None = None) -> torch.Tensor:
        """Ranking scores ``[...]`` of per-task scores ``[..., T]`` (a FormulaError names a bad formula)."""
        if formula is None:
            model = self.configured
        elif (model := self._by_formula.get(formula)) is None:
            if len(self._by_formula) >= 64:
                self._by_formula.clear()
            model = self._by_formula[formula] = ValueModel(formula, self.tasks)
        return task_scores[..., self.primary] if model is None else model(task_scores)


def merge_candidates(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each request's ``T`` candidate lists ``ids [B, T, K0]`` (-1: none) as one list in id order:
    the ids ``[B, M]``, the slot in the ``T·K0`` lists each came from ``[B, M]`` and bool ``[B, M]``
    valid (not empty, not a repeat)."""
    b, t, k0 = ids.shape
    merged, order = ids.view(b, t * k0).sort(dim=1)  # [B, M]
    repeat = torch.cat([torch.zeros_like(merged[:, :1], dtype=torch.bool), merged[:, 1:] == merged[:, :-1]], 1)
    return merged, order, (merged != -1) & ~repeat  # -1 marks an empty slot (never an item id)


def top_k(
    merged: torch.Tensor, valid: torch.Tensor, task_scores: torch.Tensor, value_scores: torch.Tensor, k: int
) -> Retrieved:
    """The ``k`` best valid candidates ``merged [B, M]`` by ``value_scores [B, M]``, with their
    ``task_scores [B, M, T]``; padded with -1 / -inf / 0 past the valid ones. A formula may give
    NaN or ±inf: the ranking key is finite (NaN last, ±inf at the ends), so a slot is empty only
    when it holds no candidate; the reported score is the value itself."""
    b, t = merged.shape[0], task_scores.shape[-1]
    finite = value_scores.nan_to_num(nan=-_BIG, posinf=_BIG, neginf=-_BIG)
    kk = min(k, value_scores.shape[1])
    top = torch.topk(torch.where(valid, finite, float("-inf")), kk, dim=1)  # [B, kk]
    found = valid.gather(1, top.indices)
    picked = torch.where(found, merged.gather(1, top.indices), -1)
    scores = torch.where(found, value_scores.gather(1, top.indices), float("-inf"))
    per_task = torch.where(found[..., None], task_scores.gather(1, top.indices[..., None].expand(-1, -1, t)), 0.0)
    if kk < k:
        picked = torch.cat([picked, picked.new_full((b, k - kk), -1)], 1)
        scores = torch.cat([scores, scores.new_full((b, k - kk), float("-inf"))], 1)
        per_task = torch.cat([per_task, per_task.new_zeros(b, k - kk, t)], 1)
    return Retrieved(picked, scores, per_task)
