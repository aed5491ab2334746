"""RetrievalModel: the index as a layer of one served model (SilverTorch §1).

One forward pass, top to bottom::

    history ids, actions, features                    (B requests, L history events in all)
      → cached item embeddings of the history          [L, D]    the embedding cache, no item tower
      → user tower                                     [B, D]
      → one query per task                             [B, T, D]
      → SilverTorch index, all B·T queries one batch    [B, T, K0] probe → partial Bloom → int8 scan
                                                                  → exact check → top-K0 (widening)
      → merge each request's T lists, drop duplicates  [B, M]    M = T·K0 slots
      → OverArch over the cached item state            [B, M, T] per-task logits
      → Value Model over the task probabilities        [B, M]
      → top-k                                          [B, k]    ids, scores, per-task scores

Without an OverArch, the per-task scores are the queries' inner products with the index's stored
vectors, and the ranking score is the primary task's: the model is then exact filtered top-k by
inner product when the index probes every list.

The search is the only step with host-side decisions (parsing the filter, planning the probes).
:meth:`RetrievalModel.plan` makes them; :meth:`RetrievalModel.execute` runs everything else,
including the search, in tensor ops with static shapes (``torch.export``-able, see
:mod:`sterling.retrieval.export`). The eager :meth:`forward` runs the index's fused kernels instead and
returns the same results.

Candidates are addressed by *segment rows* (the index's IVF order); the embedding cache is stored in
that order. The model is composed over a compacted index (no fresh items); its :meth:`upsert`,
:meth:`delete` and :meth:`compact` then change the index and the model's rows together (live items:
rows past the snapshot's, :mod:`sterling.retrieval.fresh`). The exported program serves the snapshot.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch import nn

from sterling.index.item_index import ItemIndex
from sterling.index.search import find_sorted
from sterling.models.overarch import OverArch
from sterling.models.towers import TaskQueries, UserTower
from sterling.models.value_model import ValueModel
from sterling.ops.reference.masked_ivf_topk import masked_ivf_topk
from sterling.retrieval.fresh import FreshRows, gather_rows, item_cache_rows

_BIG = 3.0e38  # the ranking key of +inf (and -_BIG of NaN and -inf): finite, inside float32

__all__ = [
    "Candidates",
    "Retrieved",
    "RetrievalModel",
    "ServingConfig",
    "Trace",
    "UserInputs",
    "check_k",
    "parse_inputs",
    "per_query",
]


@dataclass(frozen=True)
class ServingConfig:
    """How the composed model answers.

    Args:
        tasks (tuple[str, ...]): task names ``T``, in the order of the task queries and scores.
        features (tuple[str, ...]): the user tower's context + user features, in order.
        k0 (int): candidates each task query takes from the index.
        nprobe (int | None): lists probed (None: the index's default).
        primary_task (str): the ranking score when there is no Value Model.
        value_formula (str | None): the Value Model's formula over the task probabilities.
        max_history (int): most recent history events read.
        use_overarch (bool): re-score with the OverArch (when the model has one); False ranks the
            index's candidates by inner product.
    """

    tasks: tuple[str, ...]
    features: tuple[str, ...] = ()
    k0: int = 1000
    nprobe: int | None = None
    primary_task: str | None = None
    value_formula: str | None = None
    max_history: int = 100
    use_overarch: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str) or not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be a non-empty tuple of distinct names, got {self.tasks!r}")
        if isinstance(self.features, str) or len(set(self.features)) != len(self.features):
            raise ValueError(f"features must be a tuple of distinct names, got {self.features!r}")
        for name in ("k0", "max_history"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.nprobe is not None and (
            isinstance(self.nprobe, bool) or not isinstance(self.nprobe, int) or self.nprobe < 1
        ):
            raise ValueError(f"nprobe must be None or an int >= 1, got {self.nprobe!r}")
        if self.value_formula is not None:
            ValueModel(self.value_formula, self.tasks)  # a FormulaError here, never at query time
        if self.primary_task is not None and self.primary_task not in self.tasks:
            raise ValueError(f"primary task {self.primary_task!r} is not one of the tasks {list(self.tasks)}")

    @property
    def primary(self) -> int:
        return 0 if self.primary_task is None else self.tasks.index(self.primary_task)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping) -> ServingConfig:
        return cls(**{**d, "tasks": tuple(d["tasks"]), "features": tuple(d["features"])})


@dataclass(frozen=True)
class UserInputs:
    """A batch of ``B`` requests' user side, as the model reads it.

    Attributes:
        history_rows (torch.Tensor): int64 ``[L]``, segment rows of the history items, oldest first.
        history_actions (torch.Tensor): int64 ``[L]`` action bitmasks.
        history_offsets (torch.Tensor): int64 ``[B + 1]``.
        features (torch.Tensor): int64 ``[B, F]`` encoded features, in ``ServingConfig.features`` order.
        history_vectors (torch.Tensor | None): float32 ``[L, D]``, the history's cached embeddings
            when they come from elsewhere (the shards of :mod:`sterling.serving.shards`); then
            ``history_rows`` is not read.
    """

    history_rows: torch.Tensor
    history_actions: torch.Tensor
    history_offsets: torch.Tensor
    features: torch.Tensor
    history_vectors: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.history_offsets.shape[0] - 1


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


@dataclass(frozen=True)
class Candidates:
    """The filtered top-K0 of ``Q`` task queries, from one index, one shard or merged shards.

    Args:
        ids (torch.Tensor): int64 ``[Q, K0]``, -1 where fewer pass.
        scores (torch.Tensor): float32 ``[Q, K0]``, descending, -inf where ids is -1.
        state (torch.Tensor): float32 ``[Q, K0, S]``, each candidate's item state
            (:meth:`RetrievalModel.candidate_state`; 0 where ids is -1).
    """

    ids: torch.Tensor
    scores: torch.Tensor
    state: torch.Tensor


@dataclass
class Trace:
    """What one forward spent, for metrics: seconds per stage (``user_tower``, ``filter``, ``ann``,
    ``overarch``, ``value_model``) and the candidates each request kept after the filter and the
    merge (int64 ``[B]``)."""

    seconds: dict[str, float] = field(default_factory=dict)
    candidates: torch.Tensor | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class RetrievalModel(nn.Module):
    """User tower, task queries, the item index, OverArch, Value Model and the embedding cache.

    Args:
        user_tower (UserTower): history (through the cached embeddings) + features → ``[B, D]``.
        task_queries (TaskQueries): ``[B, D]`` → ``[B, T, D]``.
        index (ItemIndex): the compacted item index (int8 IVF + Bloom + exact attributes).
        cache (torch.Tensor): float16 / bfloat16 ``[N, S]`` in segment order: the item tower's output
            (first ``D`` columns; the history reads it) followed by OverArch's cached item state.
        overarch (OverArch | None): the re-scorer (None: rank by inner product).
        config (ServingConfig): how it answers.
    """

    def __init__(
        self,
        user_tower: UserTower,
        task_queries: TaskQueries,
        index: ItemIndex,
        cache: torch.Tensor,
        overarch: OverArch | None,
        config: ServingConfig,
    ) -> None:
        super().__init__()
        if index.fresh_items:
            raise ValueError(
                f"the index holds {index.fresh_items} fresh items the model's cache does not cover: "
                "compact() it and publish again"
            )
        tensors = index.executor_tensors()
        n, d = tensors["codes"].shape
        width = d if overarch is None or not config.use_overarch else overarch.state_dim
        if (
            cache.shape[0] != n
            or cache.shape[1] < width
            or (overarch is not None and cache.shape[1] != overarch.state_dim)
        ):
            raise ValueError(
                f"the cache holds {tuple(cache.shape)} for an index of {n} items and an item state of width {width}"
            )
        tower = user_tower.cfg
        if tuple(config.features) != tower.context_features + tower.user_features:
            raise ValueError(
                f"the serving features {list(config.features)} are not the user tower's "
                f"{list(tower.context_features + tower.user_features)}"
            )
        if config.max_history > tower.max_history or tower.dim != d:
            raise ValueError(
                f"the user tower reads at most {tower.max_history} events of width {tower.dim}; the "
                f"model was asked for {config.max_history} over an index of width {d}"
            )
        if overarch is not None and overarch.cfg.num_tasks != len(config.tasks):
            raise ValueError(
                f"the OverArch scores {overarch.cfg.num_tasks} tasks, the model serves {len(config.tasks)}"
            )
        if task_queries.proj.out_features != len(config.tasks) * d:
            raise ValueError(
                f"the task queries give {task_queries.proj.out_features // d} queries for the "
                f"{len(config.tasks)} tasks {list(config.tasks)}"
            )
        self.user_tower = user_tower
        self.task_queries = task_queries
        self.overarch = overarch if config.use_overarch else None
        self.value_model = None if config.value_formula is None else ValueModel(config.value_formula, config.tasks)
        self.config = config
        self.index = index
        self._item_state = None if overarch is None else overarch.item_state  # of upserted items' cache rows
        self._value_models: dict[str, ValueModel] = {}
        self._set_main(tensors, cache)
        self.meta: dict = {}  # the snapshot's metadata, when loaded from one

    def _set_main(self, tensors: dict[str, torch.Tensor], cache: torch.Tensor) -> None:
        """The main segment's buffers (the index's executor tensors) and its cache rows; no fresh rows."""
        for name, value in tensors.items():
            self.register_buffer(name, value, persistent=False)
        order = torch.argsort(tensors["ids"])
        self.register_buffer("sorted_ids", tensors["ids"][order], persistent=False)
        self.register_buffer("row_of_sorted", order, persistent=False)
        self.register_buffer("cache", cache, persistent=False)
        self.fresh = FreshRows.empty(tensors["codes"].shape[1], cache)
        self._version = self.index.version

    @property
    def dim(self) -> int:
        return self.codes.shape[1]

    # ---- host side: ids → rows, filters → plan -------------------------------------------------

    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The row of each external id ``int64 [...]`` (-1 where unknown: its newest fresh row, else
        its segment row) and bool found."""
        rows, found = find_sorted(self.sorted_ids, self.row_of_sorted, ids)
        fresh = self.fresh
        if len(fresh):
            fresh_rows, fresh_found = fresh.lookup(ids)
            rows = torch.where(fresh_found, len(self.ids) + fresh_rows, rows)
            found = found | fresh_found
        return rows, found

    def _cache(self, rows: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """float32 ``[..., S]`` (or its first ``width`` columns): the cache rows of ``rows [...]``."""
        cache, fresh = (
            (self.cache, self.fresh.cache) if width is None else (self.cache[:, :width], self.fresh.cache[:, :width])
        )
        return gather_rows(cache, fresh, rows).float()

    def history_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 ``[..., D]``: the cached embeddings of ``rows`` (what the user tower reads)."""
        return self._cache(rows, self.dim)

    def candidate_state(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 ``[..., S]``: what scoring reads of candidate ``rows``: the cached OverArch item
        state, or without an OverArch the index's stored vectors (``S = D``)."""
        if self.overarch is None:
            codes = gather_rows(self.codes, self.fresh.codes, rows).float()
            return codes * gather_rows(self.scales, self.fresh.scales, rows)[..., None]
        return self._cache(rows)

    def states_of(self, rows: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
        """float32 ``[..., S]``: :meth:`candidate_state` of ``rows`` where ``found``, 0 elsewhere
        (safe on an index holding no item)."""
        width = self.dim if self.overarch is None else self.cache.shape[1]
        out = torch.zeros(*rows.shape, width)
        out[found] = self.candidate_state(rows[found])
        return out

    def rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 ``[...]``: the segment row of each external id; a ValueError names unknown ids."""
        ids = torch.as_tensor(ids, dtype=torch.int64)
        rows, found = self.lookup(ids)
        if not bool(found.all()):
            raise ValueError(f"unknown item ids {ids[~found].unique()[:10].tolist()} (not in the index)")
        return rows

    def check_filter(self, expr: str) -> None:
        """Parse and compile ``expr`` over the index's features (cached): a FilterError names the
        position of a malformed filter or an unknown feature."""
        self.index.check_filter(expr)

    def inputs(
        self,
        histories: Sequence[Sequence[int]],
        actions: Sequence[Sequence[int]] | None = None,
        features: Sequence[Mapping[str, int]] | None = None,
    ) -> UserInputs:
        """The :class:`UserInputs` of ``B`` requests: each a history of external item ids (oldest
        first; the latest ``max_history`` are read), their action bitmasks (default 1) and encoded
        features by name (missing ones are 0; unknown names are an error)."""
        ids, inputs = parse_inputs(self.config, histories, actions, features)
        return replace(inputs, history_rows=self.rows_of(ids))

    def plan(self, batch_size: int, filter: str | Sequence[str | None] | None):
        """The index's host-side plan for ``B`` requests (one filter each, or one for all): per
        task query, the lists to probe and the rows the filter allows (exact, live)."""
        self._check_current()
        filters = per_query(filter, batch_size, len(self.config.tasks))
        return self.index.plan(self.config.k0, filters, self.config.nprobe)

    def _check_current(self) -> None:
        if self.index.version is not self._version:
            raise ValueError(
                "the index changed (upsert, delete or compact) since the model was composed from it; "
                "its cached embeddings and tensors are stale: publish and load the model again"
            )

    # ---- the model ---------------------------------------------------------------------------

    def _history_of(self, inputs: UserInputs) -> torch.Tensor:
        """float32 ``[L, D]``: the history's cached embeddings (given, or read from the cache)."""
        if inputs.history_vectors is not None:
            return inputs.history_vectors
        return self.history_vectors(inputs.history_rows)

    def history(self, inputs: UserInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The history's cached embeddings, padded ``[B, max_history, D]``, and its mask."""
        return _padded(self._history_of(inputs), inputs.history_offsets, self.config.max_history)

    def encode(self, inputs: UserInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """User embeddings ``[B, D]`` and task queries ``[B, T, D]``."""
        history = self._history_of(inputs)  # [L, D]
        feats = {n: inputs.features[:, i] for i, n in enumerate(self.config.features)}
        users = self.user_tower(history, inputs.history_actions, inputs.history_offsets, feats)
        return users, self.task_queries(users)

    def score(
        self,
        inputs: UserInputs,
        users: torch.Tensor,
        queries: torch.Tensor,
        rows: torch.Tensor,
        k: int,
        value: str | None = None,
        trace: Trace | None = None,
    ) -> Retrieved:
        """Rank the per-task candidate rows ``[B, T, K0]`` (-1: none) of ``B`` requests: merge,
        drop duplicates, score (OverArch or inner products), Value Model (``value``: a formula
        in place of the configured one), top-``k``."""
        b, t, k0 = rows.shape
        ids = torch.where(rows >= 0, gather_rows(self.ids, self.fresh.ids, rows.clamp(min=0)), -1)
        flat = rows.view(b, t * k0)
        return self._rank(
            inputs,
            users,
            queries,
            ids,
            lambda order: self.candidate_state(flat.gather(1, order).clamp(min=0)),
            k,
            value,
            trace,
        )

    def score_candidates(
        self,
        inputs: UserInputs,
        users: torch.Tensor,
        queries: torch.Tensor,
        ids: torch.Tensor,
        state: torch.Tensor,
        k: int,
        value: str | None = None,
        trace: Trace | None = None,
    ) -> Retrieved:
        """:meth:`score` of candidates given by external ``ids`` ``[B, T, K0]`` (-1: none) and
        their item state ``[B, T, K0, S]`` (:meth:`candidate_state`), e.g. merged from shards."""
        b, t, k0 = ids.shape
        flat = state.reshape(b, t * k0, state.shape[-1])
        return self._rank(
            inputs,
            users,
            queries,
            ids,
            lambda order: flat.gather(1, order[..., None].expand(-1, -1, flat.shape[2])),
            k,
            value,
            trace,
        )

    def _rank(
        self,
        inputs: UserInputs,
        users: torch.Tensor,
        queries: torch.Tensor,
        ids: torch.Tensor,
        state_of: Callable[[torch.Tensor], torch.Tensor],
        k: int,
        value: str | None,
        trace: Trace | None,
    ) -> Retrieved:
        """The ranking of candidate ``ids`` ``[B, T, K0]`` (-1: none): merged in id order (so the
        same candidates meet OverArch in the same order however they were found, from one index
        or from shards), ``state_of(slots [B, M] in the T·K0 lists)`` giving their item state."""
        trace = trace or Trace()
        b, t, k0 = ids.shape
        merged, order = ids.view(b, t * k0).sort(dim=1)  # [B, M]
        repeat = torch.cat([torch.zeros_like(merged[:, :1], dtype=torch.bool), merged[:, 1:] == merged[:, :-1]], 1)
        valid = (merged != -1) & ~repeat  # [B, M]; -1 marks an empty slot (never an item id)
        with trace.stage("overarch"):
            task_scores = self.task_scores_of(inputs, users, queries, state_of(order))  # [B, M, T]
        with trace.stage("value_model"):
            value_scores = self.value_of(task_scores, value)  # [B, M]
            # rank on a finite key (a formula may give NaN or ±inf: NaN last, ±inf at the ends), so a
            # slot is empty only when it holds no candidate; the reported score is the value itself
            finite = value_scores.nan_to_num(nan=-_BIG, posinf=_BIG, neginf=-_BIG)
            kk = min(k, value_scores.shape[1])
            top = torch.topk(torch.where(valid, finite, float("-inf")), kk, dim=1)  # [B, kk]
            found = valid.gather(1, top.indices)
            picked = torch.where(found, merged.gather(1, top.indices), -1)
            scores = torch.where(found, value_scores.gather(1, top.indices), float("-inf"))
            per_task = torch.where(
                found[..., None], task_scores.gather(1, top.indices[..., None].expand(-1, -1, t)), 0.0
            )
        trace.candidates = valid.sum(1)
        if kk < k:
            picked = torch.cat([picked, picked.new_full((b, k - kk), -1)], 1)
            scores = torch.cat([scores, scores.new_full((b, k - kk), float("-inf"))], 1)
            per_task = torch.cat([per_task, per_task.new_zeros(b, k - kk, t)], 1)
        return Retrieved(picked, scores, per_task)

    def value_of(self, task_scores: torch.Tensor, value: str | None = None) -> torch.Tensor:
        """Ranking scores ``[...]`` of per-task scores ``[..., T]``: the Value Model of ``value`` (a
        formula; None: the configured one), or the primary task's score without one."""
        if value is None:
            model = self.value_model
        elif (model := self._value_models.get(value)) is None:
            if len(self._value_models) >= 64:
                self._value_models.clear()
            model = self._value_models[value] = ValueModel(value, self.config.tasks)  # a FormulaError names a bad one
        return task_scores[..., self.config.primary] if model is None else model(task_scores)

    def task_scores_of(
        self, inputs: UserInputs, users: torch.Tensor, queries: torch.Tensor, state: torch.Tensor
    ) -> torch.Tensor:
        """Per-task scores ``[B, M, T]`` of candidates with item ``state`` ``[B, M, S]``
        (:meth:`candidate_state`): OverArch's probabilities, or (without an OverArch) the task
        queries' inner products with the index's stored vectors."""
        if self.overarch is None:
            return torch.einsum("btd,bmd->bmt", queries, state)
        history, mask = self.history(inputs)
        return torch.sigmoid(self.overarch(users, queries, history, mask, state))

    def execute(self, inputs: UserInputs, probes: torch.Tensor, allowed: torch.Tensor, k: int) -> Retrieved:
        """The whole forward in tensor ops (the exported program): ``probes`` int64 ``[B·T]`` and
        ``allowed`` int64 ``[B·T, W]`` come from :meth:`plan`."""
        users, queries = self.encode(inputs)
        b, t, d = queries.shape
        _, rows = masked_ivf_topk(
            queries.reshape(b * t, d),
            self.centroids,
            self.row_list,
            self.codes,
            self.scales,
            probes,
            allowed,
            self.config.k0,
        )
        return self.score(inputs, users, queries, rows.view(b, t, -1), k)

    @torch.no_grad()
    def forward(
        self,
        inputs: UserInputs,
        filter: str | Sequence[str | None] | None = None,
        k: int = 100,
        value: str | None = None,
        trace: Trace | None = None,
    ) -> Retrieved:
        """Top-``k`` for ``B`` requests under their filters (one string for all, or B), with the
        index's fused kernels; ``value`` replaces the configured Value Model formula; ``trace``
        collects the time per stage."""
        self._check_current()
        return self.retrieve(inputs, self.search_candidates, filter, k, value, trace)

    @torch.no_grad()
    def search_candidates(self, queries: torch.Tensor, filters: list[str | None]) -> Candidates:
        """The index's filtered top-K0 of task queries ``[Q, D]`` (one filter each), with their item state."""
        found = self.index.search(queries, k=self.config.k0, filter=filters, nprobe=self.config.nprobe)
        rows, present = self.lookup(found.ids)
        return Candidates(found.ids, found.scores, self.states_of(rows, present))

    @torch.no_grad()
    def retrieve(
        self,
        inputs: UserInputs,
        search: Callable[[torch.Tensor, list[str | None]], Candidates],
        filter: str | Sequence[str | None] | None = None,
        k: int = 100,
        value: str | None = None,
        trace: Trace | None = None,
    ) -> Retrieved:
        """:meth:`forward` with the candidates from ``search(queries [B·T, D], filters)``: this
        model's index, or the merged shards of :class:`sterling.serving.shards.ShardedModel`."""
        check_k(k, self.config.k0)
        if inputs.batch_size == 0:
            return self.empty_answer(k)
        trace = trace or Trace()
        with trace.stage("user_tower"):
            users, queries = self.encode(inputs)
        b, t, d = queries.shape
        with trace.stage("filter"):
            filters = per_query(filter, b, t)
            for expr in set(filters) - {None}:
                self.check_filter(expr)
        with trace.stage("ann"):
            found = search(queries.reshape(b * t, d), filters)  # [B·T, K0]
        k0 = found.ids.shape[1]
        return self.score_candidates(
            inputs, users, queries, found.ids.view(b, t, k0), found.state.view(b, t, k0, -1), k, value, trace
        )

    def empty_answer(self, k: int) -> Retrieved:
        """The answer to no requests: ``[0, k]`` ids and scores, ``[0, k, T]`` task scores."""
        return Retrieved(
            torch.zeros(0, k, dtype=torch.int64), torch.zeros(0, k), torch.zeros(0, k, len(self.config.tasks))
        )

    def recommend(
        self,
        history: Sequence[int],
        filter: str | None = None,
        k: int = 10,
        actions: Sequence[int] | None = None,
        features: Mapping[str, int] | None = None,
    ) -> Retrieved:
        """Top-``k`` for one user from the item ids of their history (oldest first)."""
        inputs = self.inputs([list(history)], None if actions is None else [list(actions)], [dict(features or {})])
        return self(inputs, filter=filter, k=k)

    @torch.no_grad()
    def rank(self, inputs: UserInputs, item_ids: torch.Tensor) -> torch.Tensor:
        """Per-task scores ``[B, M, T]`` of given items ``int64 [B, M]`` (the ranking entry point):
        OverArch's probabilities over the candidates' item state gathered from the cache (the item
        tower never runs), or without an OverArch the task queries' inner products."""
        item_ids = torch.as_tensor(item_ids)
        if item_ids.is_floating_point() or item_ids.dim() != 2 or item_ids.shape[0] != inputs.batch_size:
            raise ValueError(
                f"item_ids must be integer [B = {inputs.batch_size}, M], got {item_ids.dtype} {list(item_ids.shape)}"
            )
        self._check_current()
        rows = self.rows_of(item_ids.to(torch.int64))
        if inputs.batch_size == 0:
            return torch.zeros(0, item_ids.shape[1], len(self.config.tasks))
        users, queries = self.encode(inputs)
        return self.task_scores_of(inputs, users, queries, self.candidate_state(rows))

    # ---- live items --------------------------------------------------------------------------

    def upsert(
        self, ids: torch.Tensor | Sequence[int], embeddings: torch.Tensor, attributes: Sequence[Mapping]
    ) -> None:
        """Insert or replace items (``ids int64 [M]``, distinct; item-tower ``embeddings float [M, D]``;
        attribute dicts) in the index and the model's rows; visible to the next forward. A bad
        argument is a ValueError and changes nothing."""
        self._check_current()
        self.index.upsert(ids, embeddings, attributes)  # validates everything first
        ids = torch.as_tensor(ids, dtype=torch.int64)
        vectors = torch.as_tensor(embeddings, dtype=torch.float32)
        self.fresh = self.fresh.added(ids, vectors, item_cache_rows(vectors, self._item_state, self.cache.dtype))
        self._version = self.index.version
        if len(ids) and self.index.fresh_items == 0:  # the index compacted itself
            self._relayout()

    def delete(self, ids: torch.Tensor | Sequence[int]) -> int:
        """Remove items from search (their rows stay, for the histories that name them); returns
        how many were live."""
        self._check_current()
        removed = self.index.delete(ids)
        self._version = self.index.version
        return removed

    def compact(self) -> None:
        """Fold the fresh rows into the main segment (the index's :meth:`~ItemIndex.compact`) and
        lay the model's buffers and cache out in its new order; deleted items leave the model."""
        self._check_current()
        self.index.compact()
        self._relayout()

    def _relayout(self) -> None:
        """Buffers and cache for the index's (compacted) main segment, each item's cache row its
        current one (main or fresh); the fresh rows are folded in."""
        tensors = self.index.executor_tensors()
        rows, found = self.lookup(tensors["ids"])
        cache = gather_rows(self.cache, self.fresh.cache, rows.clamp(min=0))
        if not bool(found.all()):
            raise RuntimeError("the compacted index holds items the model has no cache rows for")
        self._set_main(tensors, cache)


def _padded(values: torch.Tensor, offsets: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged ``values [L, D]`` → zero-padded ``[B, width, D]`` holding each row's latest ``width``
    values, and its mask bool ``[B, width]``; no host syncs (exportable)."""
    b, total = offsets.shape[0] - 1, values.shape[0]
    position = torch.arange(total)
    owner = torch.searchsorted(offsets, position, right=True) - 1
    from_end = offsets[owner + 1] - 1 - position
    column = torch.where(from_end < width, width - 1 - from_end, width)  # older values go to a spare column
    slot = owner * (width + 1) + column  # flat slots: index_add exports without size guards
    padded = values.new_zeros(b * (width + 1), values.shape[1]).index_add_(0, slot, values)
    mask = torch.zeros(b * (width + 1)).index_add_(0, slot, torch.ones_like(slot, dtype=torch.float32)) > 0
    return padded.view(b, width + 1, -1)[:, :width], mask.view(b, width + 1)[:, :width]


def _int_tensor(values: list, what: str) -> torch.Tensor:
    """int64 ``[len(values)]``; a ValueError names the first value that is not an integer."""
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not -(2**63) <= int(v) < 2**63:
            raise ValueError(f"{what} must be 64-bit integers, got {v!r}")
    return torch.tensor([int(v) for v in values], dtype=torch.int64)


def parse_inputs(
    config: ServingConfig,
    histories: Sequence[Sequence[int]],
    actions: Sequence[Sequence[int]] | None = None,
    features: Sequence[Mapping[str, int]] | None = None,
) -> tuple[torch.Tensor, UserInputs]:
    """The history item ids ``int64 [L]`` of ``B`` requests (the latest ``max_history`` each) and
    their :class:`UserInputs` with ``history_rows`` still -1: checks the lengths, the integers and
    the feature names (see :meth:`RetrievalModel.inputs`)."""
    b, keep = len(histories), config.max_history
    actions = [[1] * len(h) for h in histories] if actions is None else actions
    features = [{}] * b if features is None else features
    if len(actions) != b or len(features) != b:
        raise ValueError(f"{b} histories, {len(actions)} action lists and {len(features)} feature dicts")
    ids, acts, lengths = [], [], []
    for h, a in zip(histories, actions):
        if len(h) != len(a):
            raise ValueError(f"a history of {len(h)} items has {len(a)} actions")
        ids += list(h[len(h) - keep :] if len(h) > keep else h)
        acts += list(a[len(a) - keep :] if len(a) > keep else a)
        lengths.append(min(len(h), keep))
    known = config.features
    for f in features:
        unknown = sorted(set(f) - set(known))
        if unknown:
            raise ValueError(f"unknown features {unknown}; the model takes {list(known)}")
    offsets = torch.zeros(b + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0, out=offsets[1:])
    ids = _int_tensor(ids, "history item ids")
    return ids, UserInputs(
        history_rows=torch.full_like(ids, -1),
        history_actions=_int_tensor(acts, "actions"),
        history_offsets=offsets,
        features=_int_tensor([f.get(n, 0) for f in features for n in known], "features").view(b, len(known)),
    )


def per_query(filter: str | Sequence[str | None] | None, b: int, t: int) -> list[str | None]:
    """One filter per task query (request-major): each request's filter repeated for its T queries."""
    if filter is None or isinstance(filter, str):
        return [filter] * (b * t)
    filters = list(filter)
    if len(filters) != b:
        raise ValueError(f"{len(filters)} filters for {b} requests")
    return [f for f in filters for _ in range(t)]


def check_k(k: int, k0: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= k0:
        raise ValueError(f"k must be an int in [1, k0 = {k0}], got {k!r}")
