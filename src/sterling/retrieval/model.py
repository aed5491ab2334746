"""RetrievalModel: the index as a layer of one served model (SilverTorch §1).

One forward pass, top to bottom::

    history rows, actions, features                   (B requests, L history events in all)
      → cached item embeddings of the history          [L, D]    the item table, no item tower
      → user tower                                     [B, D]    pooled two-tower, or HSTU / SASRec
      → one query per task                             [B, T, D]
      → the item index, all B·T queries one batch      [B·T, K0] plan → probe → partial Bloom → int8
                                                                 scan → exact check → top-K0, minus
                                                                 each request's excluded ids
      → gather the candidates' item state              [B·T, K0, S] by the index's rows
      → merge each request's T lists, drop duplicates  [B, M]    M = T·K0 slots
      → OverArch over the item state                   [B, M, T] per-task probabilities; or the
                                                                 request-level ranker over [history ‖
                                                                 candidates] (M-FALCON, one pass each)
      → Value Model over the task probabilities        [B, M]
      → top-k                                          [B, k]    ids, scores, per-task scores

Without an OverArch, the per-task scores are the queries' inner products with the index's stored
vectors, and the ranking score is the primary task's: the model is then exact filtered top-k by
inner product when the index probes every list.

Items are addressed by the index's rows (:meth:`ItemIndex.rows_of`); their cached state lives in the
index beside them (:mod:`sterling.retrieval.item_table`), so live upserts, deletes and compaction
change one store. The search is the only step with host-side decisions (the filter plan);
:meth:`RetrievalModel.plan` makes them and :meth:`RetrievalModel.execute` runs everything else in
tensor ops with static shapes over a compacted index (``torch.export``-able,
:mod:`sterling.retrieval.export`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import torch
from torch import nn

from sterling.index.item_index import ItemIndex, QueryPlan
from sterling.models.overarch import OverArch
from sterling.models.ranker import SequenceRanker
from sterling.models.sequence_tower import SequenceUserTower
from sterling.models.towers import TaskQueries, UserTower
from sterling.ops.reference.masked_ivf_topk import masked_ivf_topk
from sterling.retrieval.config import ServingConfig
from sterling.retrieval.inputs import (
    UserInputs,
    check_item_ids,
    check_k,
    padded,
    parse_inputs,
    per_query,
    per_query_exclude,
)
from sterling.retrieval.item_table import ItemEncoder, ItemTable
from sterling.retrieval.rank import Candidates, Retrieved, Trace, ValueModels, merge_candidates, top_k
from sterling.retrieval.served import ItemCount

__all__ = ["RetrievalModel", "Search"]

Search = Callable[[torch.Tensor, list, list | None], Candidates]
"""``search(queries [Q, D], filters: Q expressions or None, exclude: Q id lists or None) →
Candidates [Q, K0]``."""


class RetrievalModel(nn.Module):
    """User tower, task queries, the item index, OverArch, Value Model and the item table (a
    :class:`~sterling.retrieval.served.ServedModel`).

    Args:
        user_tower (UserTower | SequenceUserTower): history (through the cached embeddings) +
            features → ``[B, D]``: the two-tower's pooled tower, or an HSTU / SASRec encoder.
        task_queries (TaskQueries): ``[B, D]`` → ``[B, T, D]``.
        index (ItemIndex): the compacted item index (int8 IVF + Bloom + exact attributes); the
            model keeps ``cache`` in it as its item table.
        cache (torch.Tensor): float16 / bfloat16 ``[N, S]`` by the index's rows: the item tower's
            output (first ``D`` columns; the history reads it) followed by OverArch's item state.
        overarch (OverArch | None): the re-scorer (None: rank by inner product).
        config (ServingConfig): how it answers.
        ranker (SequenceRanker | None): the request-level ranker (``config.use_ranker``: it scores
            the candidates in place of the OverArch); its item embeddings are the cache's last
            ``ranker.cfg.dim`` columns.
        item_encoder (ItemEncoder | None): the two-tower item tower over attributes, which embeds
            items upserted without an embedding (None: every upsert brings its embedding).
    """

    def __init__(
        self,
        user_tower: UserTower | SequenceUserTower,
        task_queries: TaskQueries,
        index: ItemIndex,
        cache: torch.Tensor,
        overarch: OverArch | None,
        config: ServingConfig,
        ranker: SequenceRanker | None = None,
        item_encoder: ItemEncoder | None = None,
    ) -> None:
        super().__init__()
        if index.fresh_items or len(index.executor_tensors()["ids"]) != len(index):
            raise ValueError(
                f"the index holds {index.fresh_items} fresh items or deleted rows the model's cache does not "
                "cover: compact() it and publish again"
            )
        n, d = len(index), index.dim
        ranker_dim = 0 if ranker is None else ranker.cfg.dim
        width = d if overarch is None or not config.use_overarch else overarch.state_dim
        if (
            cache.shape[0] != n
            or cache.shape[1] < width + ranker_dim
            or (overarch is not None and cache.shape[1] != overarch.state_dim + ranker_dim)
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
        if ranker is not None and tuple(ranker.cfg.tasks) != tuple(config.tasks):
            raise ValueError(
                f"the ranker scores the tasks {list(ranker.cfg.tasks)}, the model serves {list(config.tasks)}"
            )
        queries = config.query_tasks
        if task_queries.proj.out_features != len(queries) * d:
            raise ValueError(
                f"the task queries give {task_queries.proj.out_features // d} queries for the "
                f"{len(queries)} queries {list(queries)}"
            )
        scored = (overarch is not None and config.use_overarch) or (ranker is not None and config.use_ranker)
        if not scored and queries != config.tasks:
            raise ValueError(
                f"without an OverArch or a ranker the scores are the queries' {list(queries)}, "
                f"not the tasks {list(config.tasks)}"
            )
        if item_encoder is not None and item_encoder.dim != d:
            raise ValueError(f"the item encoder embeds in width {item_encoder.dim}, the index holds {d}")
        self.user_tower = user_tower
        self.task_queries = task_queries
        self.item_encoder = item_encoder  # a plain object, not a submodule: not in the exported program
        self.ranker = ranker if config.use_ranker else None
        self.overarch = overarch if config.use_overarch and self.ranker is None else None
        self.values = ValueModels(config.value_formula, config.tasks, config.primary)
        self.config = config
        self.index = index
        index.set_table(cache)
        by_state = self.overarch is not None or self.ranker is not None
        self.items = ItemTable(index, d, overarch, cache.dtype, by_state, ranker_dim)
        self.meta: dict = {}  # the snapshot's metadata, when loaded from one

    @property
    def dim(self) -> int:
        return self.index.dim

    def size(self) -> ItemCount:
        """Live items, and those upserted since the last compaction."""
        return ItemCount(len(self.index), self.index.fresh_items)

    # ---- the request's boundary: ids → rows, filters → plan -------------------------------------

    def rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 ``[...]``: the index's row of each external id; a ValueError names unknown ids."""
        ids = torch.as_tensor(ids, dtype=torch.int64)
        rows, found = self.index.rows_of(ids)
        if not bool(found.all()):
            raise ValueError(f"unknown item ids {ids[~found].unique()[:10].tolist()} (not in the index)")
        return rows

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

    def check_filter(self, expr: str) -> None:
        """Parse and compile ``expr`` over the index's features, once (the index caches it for the
        search): a FilterError names the position of a malformed filter or an unknown feature."""
        self.index.check_filter(expr)

    def plan(
        self,
        batch_size: int,
        filter: str | Sequence[str | None] | None,
        exclude: Sequence[Sequence[int]] | None = None,
    ) -> QueryPlan:
        """The index's host-side plan for ``B`` requests (one filter each, or one for all; ``B``
        lists of excluded ids or None): per task query, the lists to probe and the rows the filter
        allows (exact, live, not excluded)."""
        t = len(self.config.query_tasks)
        filters = per_query(filter, batch_size, t)
        return self.index.plan(
            self.config.k0, filters, self.config.nprobe, exclude=per_query_exclude(exclude, batch_size, t)
        )

    # ---- the model -----------------------------------------------------------------------------

    def history(self, inputs: UserInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The history's cached embeddings, padded ``[B, max_history, D]``, and its mask."""
        return padded(self._history_of(inputs), inputs.history_offsets, self.config.max_history)

    def _history_of(self, inputs: UserInputs) -> torch.Tensor:
        """float32 ``[L, D]``: the history's cached embeddings (given, or read from the item table)."""
        if inputs.history_vectors is not None:
            return inputs.history_vectors
        return self.items.history(inputs.history_rows)

    def encode(self, inputs: UserInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """User embeddings ``[B, D]`` and task queries ``[B, T, D]``."""
        history = self._history_of(inputs)  # [L, D]
        feats = {n: inputs.features[:, i] for i, n in enumerate(self.config.features)}
        users = self.user_tower(
            history, inputs.history_actions, inputs.history_offsets, feats, inputs.history_ts, inputs.request_ts
        )
        return users, self.task_queries(users)

    @torch.no_grad()
    def forward(
        self,
        inputs: UserInputs,
        filter: str | Sequence[str | None] | None = None,
        k: int = 100,
        value: str | None = None,
        trace: Trace | None = None,
        exclude: Sequence[Sequence[int]] | None = None,
    ) -> Retrieved:
        """Top-``k`` for ``B`` requests under their filters (one string for all, or B), with the
        index's fused kernels; ``value`` replaces the configured Value Model formula; ``trace``
        collects the time per stage; ``exclude``: per request, item ids never to answer (its
        history, items already shown), part of its filter, so ``k`` still come back."""
        return self.retrieve(inputs, self.search, filter, k, value, trace, exclude)

    @torch.no_grad()
    def retrieve(
        self,
        inputs: UserInputs,
        search: Search,
        filter: str | Sequence[str | None] | None = None,
        k: int = 100,
        value: str | None = None,
        trace: Trace | None = None,
        exclude: Sequence[Sequence[int]] | None = None,
    ) -> Retrieved:
        """:meth:`forward` with the candidates from ``search(queries [B·T, D], filters, exclude)``: this
        model's index (:meth:`search`), or the merged shards of
        :class:`sterling.serving.shards.ShardedModel`."""
        check_k(k, self.config.k0)
        if inputs.batch_size == 0:
            return Retrieved.empty(k, len(self.config.tasks))
        trace = trace or Trace()
        with trace.stage("user_tower"):
            users, queries = self.encode(inputs)  # [B, D], [B, T, D]
        b, t, d = queries.shape
        filters = per_query(filter, b, t)
        excluded = per_query_exclude(exclude, b, t)
        with trace.stage("ann"):
            found = search(queries.reshape(b * t, d), filters, excluded)  # [B·T, K0] ids, scores, [B·T, K0, S] state
        k0 = found.ids.shape[1]
        return self.rank_candidates(
            inputs, users, queries, found.ids.view(b, t, k0), found.state.view(b, t, k0, -1), k, value, trace
        )

    @torch.no_grad()
    def search(
        self, queries: torch.Tensor, filters: list[str | None], exclude: list[Sequence[int]] | None = None
    ) -> Candidates:
        """The index's filtered top-K0 of task queries ``[Q, D]`` (one filter each; ``exclude``:
        one id list each, or None), with the item state of each candidate gathered by its row."""
        found = self.index.search(queries, k=self.config.k0, filter=filters, nprobe=self.config.nprobe, exclude=exclude)
        return Candidates(found.ids, found.scores, self.items.states_of(found.rows))

    def rank_candidates(
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
        """Rank candidates ``ids [B, T, K0]`` (-1: none) with their item state ``[B, T, K0, S]``:
        merge in id order, drop duplicates, score per task (OverArch or inner products), Value
        Model (``value``: a formula in place of the configured one), top-``k``."""
        trace = trace or Trace()
        b, t, k0 = ids.shape
        merged, order, valid = merge_candidates(ids)  # [B, M]
        flat = state.reshape(b, t * k0, state.shape[-1])
        with trace.stage("overarch" if self.ranker is None else "ranker"):
            slots = flat.gather(1, order[..., None].expand(-1, -1, flat.shape[2]))  # [B, M, S]
            task_scores = self.task_scores_of(inputs, users, queries, slots, valid)  # [B, M, T]
        with trace.stage("value_model"):
            answer = top_k(merged, valid, task_scores, self.values(task_scores, value), k)
        trace.candidates = valid.sum(1)
        return answer

    def task_scores_of(
        self,
        inputs: UserInputs,
        users: torch.Tensor,
        queries: torch.Tensor,
        state: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-task scores ``[B, M, T]`` of candidates with item ``state`` ``[B, M, S]`` (``valid``
        bool ``[B, M]``: the real ones; default all): the ranker's probabilities (times the
        :meth:`engagement_prior` with ``config.retrieval_temperature``), OverArch's, or (with
        neither) the task queries' inner products with the index's stored vectors."""
        if self.ranker is not None:
            scores = self.ranker_scores(inputs, state[..., -self.ranker.cfg.dim :])
            if self.config.retrieval_temperature is None:
                return scores
            return scores * self.engagement_prior(queries, state, valid)[..., None]
        if self.overarch is None:
            return torch.einsum("btd,bmd->bmt", queries, state)
        history, mask = self.history(inputs)
        return torch.sigmoid(self.overarch(users, queries, history, mask, state[..., : self.overarch.state_dim]))

    def engagement_prior(
        self, queries: torch.Tensor, state: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """P(the request's next engagement is candidate ``m``) ``[B, M]``: the softmax over each
        request's ``valid`` candidates (0 elsewhere) of the first task query's ``[B, T, D]`` inner
        product with a candidate's index vector (of its cached embedding, ``state[..., :D]``) over
        ``config.retrieval_temperature``: the distribution the retriever was trained to give,
        restricted to the candidates. A ranker trained on impressions gives P(task | shown); their
        product ranks by P(engage and task) (measured in ``docs/benchmarks.md``)."""
        vectors = self.user_tower.index_vectors(state[..., : self.dim].float())  # [B, M, D]
        logits = torch.einsum("bd,bmd->bm", queries[:, 0], vectors) / self.config.retrieval_temperature
        if valid is None:
            return torch.softmax(logits, -1)
        logits = logits.masked_fill(~valid, torch.finfo(logits.dtype).min)
        return torch.softmax(logits, -1) * valid

    def ranker_scores(self, inputs: UserInputs, candidates: torch.Tensor) -> torch.Tensor:
        """The ranker's per-task probabilities ``[B, M, T]`` of ``M`` candidates per request (their
        ranker item embeddings ``[B, M, Dr]``): one pass per request over ``[history ‖
        candidates]`` with the target-aware mask (M-FALCON: the history's keys and values once).
        A candidate's time is its request's latest history event (0 without timestamps)."""
        b, m, dr = candidates.shape
        offsets = inputs.history_offsets
        ts = inputs.history_ts if inputs.history_ts is not None else torch.zeros_like(inputs.history_actions)
        latest = torch.zeros(b, dtype=torch.int64)
        has = offsets[1:] > offsets[:-1]
        latest[has] = ts[(offsets[1:] - 1)[has]]
        logits = self.ranker.score_candidates(
            self.items.ranker_items(inputs.history_rows),
            inputs.history_actions,
            offsets,
            ts,
            candidates.reshape(b * m, dr),
            torch.arange(b + 1) * m,
            latest.repeat_interleave(m),
        )  # [B·M, T]
        return torch.sigmoid(logits).view(b, m, -1)

    def value_of(self, task_scores: torch.Tensor, value: str | None = None) -> torch.Tensor:
        """Ranking scores ``[...]`` of per-task scores ``[..., T]`` (:class:`ValueModels`)."""
        return self.values(task_scores, value)

    def execute(
        self, inputs: UserInputs, probes: torch.Tensor, allowed: torch.Tensor, k: int, static: Mapping | None = None
    ) -> Retrieved:
        """The whole forward in tensor ops over a compacted index (the exported program):
        ``probes`` int64 ``[B·T]`` and ``allowed`` int64 ``[B·T, W]`` come from :meth:`plan`;
        ``static`` holds the index's tensors and the cache (:meth:`static_tensors`; default: read
        now)."""
        static = self.static_tensors() if static is None else static
        cache = static["cache"]
        if inputs.history_vectors is None:
            inputs = replace(inputs, history_vectors=cache[inputs.history_rows, : self.dim].float())
        users, queries = self.encode(inputs)
        b, t, d = queries.shape
        _, rows = masked_ivf_topk(
            queries.reshape(b * t, d),
            static["centroids"],
            static["row_list"],
            static["codes"],
            static["scales"],
            probes,
            allowed,
            self.config.k0,
        )
        rows = rows.view(b, t, -1)
        ids = torch.where(rows >= 0, static["ids"][rows.clamp(min=0)], -1)
        if self.overarch is None and self.ranker is None:
            state = static["codes"][rows.clamp(min=0)].float() * static["scales"][rows.clamp(min=0)][..., None]
        else:
            state = cache[rows.clamp(min=0)].float()
        return self.rank_candidates(inputs, users, queries, ids, state, k)

    def static_tensors(self) -> dict[str, torch.Tensor]:
        """The compacted index's executor tensors (``centroids``, ``row_list``, ``codes``,
        ``scales``, ``ids``) and ``cache`` ``[N, S]``, its item table: what :meth:`execute` reads."""
        tensors = self.index.executor_tensors()
        return {**tensors, "cache": self.index.table_rows(torch.arange(len(tensors["ids"])))}

    # ---- entry points beside retrieval ---------------------------------------------------------

    def recommend(
        self,
        history: Sequence[int],
        filter: str | None = None,
        k: int = 10,
        actions: Sequence[int] | None = None,
        features: Mapping[str, int] | None = None,
        exclude_seen: bool = False,
    ) -> Retrieved:
        """Top-``k`` for one user from the item ids of their history (oldest first);
        ``exclude_seen`` leaves the history's items out of the answer."""
        inputs = self.inputs([list(history)], None if actions is None else [list(actions)], [dict(features or {})])
        return self(inputs, filter=filter, k=k, exclude=[list(history)] if exclude_seen else None)

    @torch.no_grad()
    def rank(self, inputs: UserInputs, item_ids: torch.Tensor) -> torch.Tensor:
        """Per-task scores ``[B, M, T]`` of given items ``int64 [B, M]`` (the ranking entry point):
        OverArch's probabilities over the items' cached state (the item tower never runs), or
        without an OverArch the task queries' inner products."""
        item_ids = check_item_ids(item_ids, inputs.batch_size)
        rows = self.rows_of(item_ids)
        if inputs.batch_size == 0:
            return torch.zeros(0, item_ids.shape[1], len(self.config.tasks))
        users, queries = self.encode(inputs)
        return self.task_scores_of(inputs, users, queries, self.items.state(rows))

    # ---- live items ----------------------------------------------------------------------------

    def embed_items(self, attributes: Sequence[Mapping]) -> torch.Tensor:
        """float32 ``[M, D]``: the item tower's embeddings of ``M`` items from their attribute
        dicts alone, exactly as :func:`~sterling.retrieval.publish.publish` embeds an item its
        checkpoint's catalogue does not hold (a *cold* item: zero id embedding, attribute terms
        outside the trained vocabulary dropped). An id the catalogue holds is embedded cold too:
        the served model carries no id table. A ValueError says why a model cannot embed items."""
        if self.item_encoder is not None:
            return self.item_encoder(attributes)
        if isinstance(self.user_tower, SequenceUserTower):
            raise ValueError(
                "this model's retriever (HSTU / SASRec) embeds items by id only, it has no item tower over "
                "attributes: upsert each item with its embedding"
            )
        raise ValueError(
            "this snapshot carries no item tower (published without one, e.g. by an older sterling or "
            "from embeddings): upsert each item with its embedding, or publish the checkpoint again"
        )

    def upsert(
        self,
        ids: torch.Tensor | Sequence[int],
        embeddings: torch.Tensor | None = None,
        attributes: Sequence[Mapping] = (),
    ) -> None:
        """Insert or replace items (``ids int64 [M]``, distinct; item-tower ``embeddings float [M, D]``,
        or None: the item tower embeds them from their attributes, :meth:`embed_items`;
        attribute dicts): one new index row each, holding the int8 code and the cache row;
        visible to the next forward. A bad argument is a ValueError and changes nothing."""
        if embeddings is None:
            if len(attributes) != len(ids):
                raise ValueError(
                    f"an upsert without embeddings takes one attribute dict per id (the item tower embeds "
                    f"them): got {len(ids)} ids and {len(attributes)} dicts"
                )
            embeddings = self.embed_items(attributes)
        vectors = torch.as_tensor(embeddings)
        if vectors.dim() != 2 or vectors.shape[1] != self.dim or not vectors.is_floating_point():
            raise ValueError(
                f"embeddings must be float [M, D] of dimension D = {self.dim}, got {vectors.dtype} {list(vectors.shape)}"
            )
        limit = torch.finfo(self.items.dtype).max
        largest = float(vectors.detach().abs().max()) if vectors.numel() else 0.0
        if not largest <= limit:  # NaN too
            raise ValueError(
                f"embedding values must be finite (no NaN or inf) and within ±{limit:g} (the item cache "
                f"is {self.items.dtype}), got {largest:g}"
            )
        table = self.items.rows_for(vectors.float())
        if not bool(torch.isfinite(table).all()):
            raise ValueError(f"these embeddings' item state overflows the item cache ({self.items.dtype})")
        index_vectors = self.user_tower.index_vectors(vectors.float())
        self.index.upsert(ids, index_vectors, attributes, table=table)

    def delete(self, ids: torch.Tensor | Sequence[int]) -> int:
        """Remove items from search (their rows stay until compaction, for the histories that name
        them); returns how many were live."""
        return self.index.delete(ids)

    def compact(self) -> None:
        """Fold the fresh rows into the index's main segment (the item table follows); deleted
        items leave the model."""
        self.index.compact()
