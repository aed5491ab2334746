"""ItemIndex: the SilverTorch retrieval index behind one small API.

An index is one immutable state, swapped atomically:

- a **main segment** (:class:`~sterling.index.segment.Segment`): items in IVF order as int8 codes
  with per-item scales, the exact attribute store and the Bloom index, searched by the planner of
  :mod:`sterling.index.segment` (probe → partial Bloom → fused int8 scan → exact check, widening
  until k results or the catalogue is exhausted);
- **tombstones**: packed live-row words over the main segment; a deleted or replaced item's bit is
  cleared, and the fused scan skips it like a filtered row;
- a **fresh segment**: items upserted since the last :meth:`ItemIndex.compact`, stored the same
  way (int8 codes, exact attributes) and searched exactly (every passing fresh item is scored);
  its top-k merges with the main segment's.

``upsert`` and ``delete`` build the next state (copy-on-write of the small parts: live words,
fresh items) under a lock and swap the reference; ``search`` reads the reference once, so a search
running beside an update sees the old or the new version of every item, never a torn one.
``compact`` folds the fresh items into the main segment (nearest existing centroid; k-means again
when the catalogue has outgrown its lists) and drops the tombstoned rows.

For an exported model, ``plan`` does the host half of a search over a compacted index (probe
counts, the rows each query may return) and ``executor_tensors`` hands over the index's tensors:
:func:`sterling.ops.reference.masked_ivf_topk.masked_ivf_topk` then returns what ``search`` returns,
with tensor ops only.

Scores are inner products with the **stored** vectors (``codes * scale``): "exact" means exact
with respect to them. No item failing the filter is ever returned, and with ``nprobe >= nlist``
the result is the exact filtered top-k (up to ties).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sterling.index.attributes import AttributeStore
from sterling.index.bloom import BloomIndex
from sterling.index.config import IndexConfig, auto_nlist
from sterling.index.id_map import IdMap
from sterling.index.quant import Int8Codes, dequantize, quantize
from sterling.index.segment import Segment
from sterling.ops.filtered_topk import filtered_topk
from sterling.ops.plan_program import bit_of, pack_rows
from sterling.snapshot import SnapshotError, read_snapshot, write_snapshot

__all__ = ["IndexConfig", "ItemIndex", "QueryPlan", "SearchResult"]

_SNAPSHOT_FILE = "index"
_SNAPSHOT_META = "item_index"
_FORMAT = 2


@dataclass(frozen=True)
class SearchResult:
    """Top-k results of a batch of B queries.

    Args:
        ids (torch.Tensor): int64 [B, k], external item ids, -1 where fewer than k items pass.
        scores (torch.Tensor): float32 [B, k], inner products, descending, -inf where ids is -1.
        rows (torch.Tensor): int64 [B, k], the index's row of each result (:meth:`ItemIndex.rows_of`),
            -1 where ids is -1.
        explain (list[dict] | None): with ``search(..., explain=True)``: per distinct filter, the
            estimated selectivity, the plan ("ivf", "scan" or "none"), the lists probed, whether
            the Bloom plan was exact, and how many queries were widened; plus the fresh segment.
    """

    ids: torch.Tensor
    scores: torch.Tensor
    rows: torch.Tensor
    explain: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class QueryPlan:
    """The host-side half of a search of B queries (:meth:`ItemIndex.plan`): what the tensor-only
    executor :func:`sterling.ops.reference.masked_ivf_topk.masked_ivf_topk` needs per query.

    Args:
        probes (torch.Tensor): int64 [B], the IVF lists each query probes first (before the 4×
            widening of a query short of results): ``nlist`` for a scan or a gathered filter, 0
            where nothing can pass.
        allowed (torch.Tensor): int64 [B, W], W = ceil(N / 64) over the main segment's rows: row r
            (bit ``r % 64`` of word ``r // 64``) is set iff it passes the query's filter exactly
            and is not deleted.
    """

    probes: torch.Tensor
    allowed: torch.Tensor


@dataclass(frozen=True)
class _Fresh:
    """The rows upserted since the last compaction, rows ``N + r`` of the index (``r < F``), in
    arrival order: append-only until :meth:`ItemIndex.compact`, so a row handed out stays valid (a
    replaced or deleted item's row is cleared in ``live``)."""

    ids: torch.Tensor  # int64 [F]
    codes: Int8Codes  # int8 [F, D], float32 [F]
    attributes: AttributeStore  # F items
    live: torch.Tensor  # bool [F]
    id_map: IdMap  # id → its newest fresh row r
    table: torch.Tensor | None  # [F, S]: the rows' item table rows (ItemIndex.set_table)

    def kept(self, rows: torch.Tensor) -> _Fresh:
        """The fresh rows ``rows`` (int64 [M], ascending) alone, renumbered ``0..M-1``."""
        ids = self.ids[rows]
        table = None if self.table is None else self.table[rows]
        return _Fresh(ids, self.codes.take(rows), self.attributes.take(rows), self.live[rows], IdMap.build(ids), table)

    def appended(
        self, ids: torch.Tensor, codes: Int8Codes, attributes: Sequence[Mapping[str, Any]], table: torch.Tensor | None
    ) -> _Fresh:
        rows = torch.arange(len(self.ids), len(self.ids) + len(ids))
        merged = IdMap.build(torch.cat([self.id_map.sorted_ids, ids]), torch.cat([self.id_map.rows, rows]))
        return _Fresh(
            torch.cat([self.ids, ids]),
            Int8Codes(torch.cat([self.codes.codes, codes.codes]), torch.cat([self.codes.scales, codes.scales])),
            self.attributes.append(attributes),
            torch.cat([self.live, torch.ones(len(ids), dtype=torch.bool)]),
            merged,
            None if self.table is None else torch.cat([self.table, table.to(self.table.dtype)]),
        )


@dataclass(frozen=True)
class _State:
    """One immutable version of the index: rows ``[0, N)`` the main segment, ``[N, N + F)`` fresh."""

    main: Segment
    alive: torch.Tensor | None  # int64 [ceil(N / 64)] live words over main rows; None: all live
    fresh: _Fresh
    table: torch.Tensor | None  # [N, S]: the main rows' item table rows; None: no table

    @functools.cached_property
    def live_rows(self) -> torch.Tensor:
        """int64 [M]: the main rows not deleted."""
        if self.alive is None:
            return torch.arange(len(self.main))
        return torch.nonzero(bit_of(self.alive, torch.arange(len(self.main)))).view(-1)

    def rows_of(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The newest row of each id (int64 [...], -1 where none: its fresh row, else its main row,
        deleted or not) and bool [...] found."""
        rows, found = self.main.id_map.lookup(ids)
        if len(self.fresh.ids):
            fresh, in_fresh = self.fresh.id_map.lookup(ids)
            rows = torch.where(in_fresh, len(self.main) + fresh, rows)
            found = found | in_fresh
        return rows, found

    def live(self, rows: torch.Tensor) -> torch.Tensor:
        """bool [...]: whether each row (int64 [...], >= 0) holds a live item."""
        n = len(self.main)
        main_live = (
            torch.ones_like(rows, dtype=torch.bool)
            if self.alive is None
            else bit_of(self.alive, rows.clamp(max=max(n - 1, 0)))
        )
        if not len(self.fresh.ids):
            return main_live
        fresh_live = self.fresh.live[(rows - n).clamp(min=0, max=len(self.fresh.ids) - 1)]
        return torch.where(rows >= n, fresh_live, main_live)

    def gather(self, main: torch.Tensor, fresh: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``main [N, ...]`` and ``fresh [F, ...]`` stacked as the index's rows, at ``rows`` int64
        [...] (in ``[0, N + F)``), without copying either."""
        n = main.shape[0]
        if not len(fresh):
            return main[rows] if n else main.new_zeros(*rows.shape, *main.shape[1:])
        out = main[rows.clamp(max=max(n - 1, 0))] if n else fresh.new_zeros(*rows.shape, *fresh.shape[1:])
        is_fresh = rows >= n
        out[is_fresh] = fresh[rows[is_fresh] - n]
        return out

    def __len__(self) -> int:
        return len(self.live_rows) + int(self.fresh.live.sum())


class ItemIndex:
    """A searchable set of items with D-dimensional embeddings and attribute dicts.

    Build with :meth:`build` or :meth:`load`, not the constructor.

    Example::

        index = ItemIndex.build(
            torch.randn(3, 4),
            [{"genre": ["Drama", "War"], "year": 1995}, {"genre": "Comedy"}, {"year": 2001}],
            ids=torch.tensor([10, 11, 12]),
        )
        res = index.search(torch.randn(2, 4), k=2, filter="genre:Drama OR year > 2000")
        res.ids  # int64 [2, 2], drawn from {10, 12}
    """

    def __init__(self, state: _State, config: IndexConfig) -> None:
        self._state = state
        self._config = config
        self._lock = threading.Lock()

    @classmethod
    def build(
        cls,
        embeddings: torch.Tensor | np.ndarray,
        attributes: Sequence[Mapping[str, Any]],
        ids: torch.Tensor | np.ndarray | Sequence[int] | None = None,
        config: IndexConfig = IndexConfig(),
    ) -> ItemIndex:
        """Builds an index: k-means lists, int8 codes, attribute store and Bloom index.

        Args:
            embeddings (torch.Tensor | np.ndarray): float [N, D], finite.
            attributes (Sequence[Mapping[str, Any]]): N dicts such as
                ``{"genre": ["Drama", "War"], "year": 1995}`` (see
                :class:`sterling.index.attributes.AttributeStore`).
            ids (torch.Tensor | np.ndarray | Sequence[int] | None): int64 [N] unique external ids;
                default ``arange(N)``.
            config (IndexConfig): index configuration.

        Raises:
            ValueError: wrong shapes or dtypes, non-finite values, duplicate ids, bad attributes.
        """
        emb = _as_matrix(embeddings, "embeddings")
        n = emb.shape[0]
        ids_ = torch.arange(n) if ids is None else _item_ids(ids)
        if len(ids_) != n:
            raise ValueError(f"got {len(ids_)} ids for {n} embeddings")
        _check_unique(ids_)
        _check_attribute_count(attributes, n)
        store = AttributeStore.build(attributes)
        main = Segment.build(emb, store, ids_, config)
        return cls(_State(main, None, _empty_fresh(main, None), None), config)

    def __len__(self) -> int:
        return len(self._state)

    def nbytes(self) -> int:
        """Bytes held: the main segment (codes, scales, ids, centroids, attribute store, Bloom
        index), the live-row words, the fresh rows and the item table."""
        state = self._state
        fresh = state.fresh
        table = 0 if state.table is None else state.table.nbytes + fresh.table.nbytes
        return (
            state.main.nbytes()
            + (0 if state.alive is None else 8 * len(state.alive))
            + 9 * len(fresh.ids)
            + fresh.codes.nbytes()
            + fresh.attributes.nbytes()
            + table
        )

    @property
    def dim(self) -> int:
        """D, the embedding dimension."""
        return self._state.main.centroids.shape[1]

    @property
    def config(self) -> IndexConfig:
        return self._config

    @property
    def fresh_items(self) -> int:
        """Live items upserted since the last compaction (searched exactly, beside the IVF lists)."""
        return int(self._state.fresh.live.sum())

    @property
    def ids(self) -> torch.Tensor:
        """int64 [N]: the live items' external ids (main segment in IVF order, then fresh items)."""
        state = self._state
        return torch.cat([state.main.ids[state.live_rows], state.fresh.ids[state.fresh.live]])

    def rows_of(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The index's row of each external id (int64 [...]; -1 where unknown) and bool [...]
        found. Rows are one space: the main segment's ``[0, N)``, then the fresh rows. A deleted
        item keeps its row (histories may name it) until :meth:`compact`."""
        return self._state.rows_of(torch.as_tensor(ids, dtype=torch.int64))

    def ids_of(self, rows: torch.Tensor) -> torch.Tensor:
        """int64 [...]: the external id of each row (int64 [...]), -1 where the row is -1."""
        state = self._state
        return torch.where(rows >= 0, state.gather(state.main.ids, state.fresh.ids, rows.clamp(min=0)), -1)

    def vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 [..., D]: the stored (int8, dequantized) vectors of ``rows`` int64 [...] (>= 0)."""
        state = self._state
        flat = rows.reshape(-1)
        codes = state.gather(state.main.codes.codes, state.fresh.codes.codes, flat)
        scales = state.gather(state.main.codes.scales, state.fresh.codes.scales, flat)
        return dequantize(Int8Codes(codes, scales)).view(*rows.shape, self.dim)

    def set_table(self, table: torch.Tensor) -> None:
        """Gives every row a row of an item table (``[N + F, S]``, any dtype): per-item state kept by
        the index's rows (the served model's embedding cache), which every upsert extends (its
        ``table`` argument), compaction reorders and deletes drop with their rows."""
        with self._lock:
            state = self._state
            n, f = len(state.main), len(state.fresh.ids)
            if table.dim() != 2 or table.shape[0] != n + f:
                raise ValueError(
                    f"an item table must be [{n + f}, S], one row per row of the index; got {list(table.shape)}"
                )
            self._state = replace(state, table=table[:n], fresh=replace(state.fresh, table=table[n:]))

    def table_rows(self, rows: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """``[..., S]`` (or its first ``width`` columns): the item table rows of ``rows`` int64 [...]
        (>= 0; see :meth:`set_table`)."""
        state = self._state
        if state.table is None:
            raise ValueError("the index holds no item table (set_table)")
        main, fresh = state.table, state.fresh.table
        if width is not None:
            main, fresh = main[:, :width], fresh[:, :width]
        return state.gather(main, fresh, rows)

    def attributes_of(self, ids: torch.Tensor | np.ndarray | Sequence[int]) -> list[dict[str, Any]]:
        """The attribute dicts of external ``ids`` (int64 [M]); unknown ids are a ValueError."""
        state = self._state
        n = len(state.main)
        return [
            state.main.attributes.decode([r])[0] if r < n else state.fresh.attributes.decode([r - n])[0]
            for r in _locate(state, _as_ids(ids, "ids")).tolist()
        ]

    def embeddings_of(self, ids: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
        """float32 [M, D]: the stored (int8, dequantized) embeddings of external ``ids``; unknown
        ids are a ValueError."""
        return self.vectors(_locate(self._state, _as_ids(ids, "ids")))

    def search(
        self,
        queries: torch.Tensor | np.ndarray,
        k: int = 100,
        filter: str | Sequence[str | None] | None = None,
        nprobe: int | None = None,
        explain: bool = False,
        exclude: Sequence[Sequence[int] | None] | None = None,
    ) -> SearchResult:
        """Filtered top-k by inner product.

        Args:
            queries (torch.Tensor | np.ndarray): float [B, D] or [D] (then B = 1).
            k (int): results per query, k >= 1.
            filter (str | Sequence[str | None] | None): one filter expression for every query, a
                list of B expressions (None for no filter), or None.
            nprobe (int | None): IVF lists probed at least (default ``config.nprobe``); the
                planner probes more for selective filters, and ``nprobe >= nlist`` is exact.
            explain (bool): attach the plan of every distinct filter to the result.
            exclude (Sequence[Sequence[int] | None] | None): per query, external ids it must not
                return (a user's history, items already shown; unknown ids are ignored), part of
                its filter: the k results are the best of the rest, so k still come back when k
                items pass.

        Returns:
            SearchResult: ids int64 [B, k] and scores float32 [B, k]; where fewer than k items
            pass a query's filter, its tail holds id -1 and score -inf.

        Raises:
            FilterError: a malformed filter or an unknown feature, with its position.
            ValueError: wrong query shape, dtype, non-finite values, or a bad k, filter or nprobe.
        """
        state = self._state
        q = _as_matrix(queries, "queries", allow_vector=True)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index has {self.dim}")
        _check_k_nprobe(k, nprobe)
        filters = _filters(filter, q.shape[0])
        excluded = self._excluded_rows(exclude, q.shape[0])  # [B, E], -1 padded
        wide = k + excluded.shape[1]  # the best k + E hold the best k not excluded
        scores, rows, records = state.main.search(q, filters, wide, nprobe, state.alive)
        if len(state.fresh.ids):
            fresh_scores, fresh_rows = _search_fresh(state, q, filters, wide)
            fresh_rows = torch.where(fresh_rows >= 0, len(state.main) + fresh_rows, -1)
            scores, pick = torch.cat([scores, fresh_scores], 1).topk(wide, dim=1)
            rows = torch.cat([rows, fresh_rows], 1).gather(1, pick)
            records.append({"fresh_items": int(state.fresh.live.sum()), "plan": "exact"})
        if excluded.shape[1]:
            keep = (rows >= 0) & ~(rows[:, :, None] == excluded[:, None, :]).any(-1)  # [B, k + E]
            first = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k]  # kept, in score order
            kept = keep.gather(1, first)
            scores = scores.gather(1, first).masked_fill(~kept, float("-inf"))
            rows = rows.gather(1, first).masked_fill(~kept, -1)
        ids = torch.where(rows >= 0, state.gather(state.main.ids, state.fresh.ids, rows.clamp(min=0)), -1)
        return SearchResult(ids, scores, rows, records if explain else None)

    def _excluded_rows(self, exclude: Sequence[Sequence[int] | None] | None, b: int) -> torch.Tensor:
        """int64 [B, E]: the rows of each query's excluded ids that the index holds (its newest
        row: older ones are never returned), padded with -1; E = 0 without exclusions."""
        if exclude is None:
            return torch.zeros(b, 0, dtype=torch.int64)
        if isinstance(exclude, (str, bytes)) or not isinstance(exclude, Sequence) or len(exclude) != b:
            got = f"{len(exclude)} lists" if isinstance(exclude, Sequence) else type(exclude).__name__
            raise ValueError(f"exclude must be None or a list of {b} id lists (one per query), got {got}")
        per_query = []
        for ids in exclude:
            rows, found = self.rows_of(_as_ids([] if ids is None else ids, "excluded ids"))
            per_query.append(rows[found].unique())
        out = torch.full((b, max((len(r) for r in per_query), default=0)), -1, dtype=torch.int64)
        for i, rows in enumerate(per_query):
            out[i, : len(rows)] = rows
        return out

    def check_filter(self, expr: str) -> None:
        """Parses ``expr`` and compiles it over the index's features (cached, as a search would).

        Raises:
            FilterError: a malformed filter or an unknown feature, with its position.
        """
        if not isinstance(expr, str):
            raise ValueError(f"a filter must be a str, got {type(expr).__name__}")
        self._state.main.compiled(expr)

    def plan(
        self,
        k: int,
        filter: str | Sequence[str | None] | None = None,
        nprobe: int | None = None,
        batch: int | None = None,
        exclude: Sequence[Sequence[int] | None] | None = None,
    ) -> QueryPlan:
        """The plan of a search, for the tensor-only executor: what :meth:`search` decides on the
        host (probe counts, the rows each filter lets through) without the queries.

        ``masked_ivf_topk(queries, **tensors, probes=plan.probes, allowed=plan.allowed, k=k)``
        with ``tensors`` from :meth:`executor_tensors` (``ids`` popped) returns the rows of
        ``search(queries, k, filter, nprobe)``: the same ids (``ids[rows]``, -1 kept) and scores
        up to float32 rounding (ties aside). The plan and the tensors describe the index as it is
        now: take both before an update, and plan on a compacted index (see Raises).

        Args:
            k (int): results per query, k >= 1.
            filter (str | Sequence[str | None] | None): as in :meth:`search`.
            nprobe (int | None): as in :meth:`search`.
            batch (int | None): B, the number of queries; default the length of a ``filter``
                list, else 1.
            exclude (Sequence[Sequence[int] | None] | None): as in :meth:`search`: the excluded
                rows' bits are cleared from each query's ``allowed`` words.

        Returns:
            QueryPlan: probes int64 [B] and allowed int64 [B, ceil(N / 64)]; each distinct
            filter's rows are computed once and cached on the index's segment.

        Raises:
            FilterError: a malformed filter or an unknown feature, with its position.
            ValueError: a bad k, filter, nprobe or batch, or fresh items not yet compacted (the
                executor covers the main segment only: :meth:`compact` first).
        """
        state = self._state
        _check_k_nprobe(k, nprobe)
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 0):
            raise ValueError(f"batch must be None or an int >= 0, got {batch!r}")
        if batch is None:
            batch = len(filter) if isinstance(filter, Sequence) and not isinstance(filter, str) else 1
        filters = _filters(filter, batch)
        if len(state.fresh.ids):
            raise ValueError(
                f"the index holds {len(state.fresh.ids)} fresh items, which the executor does not "
                "search: compact() first"
            )
        main = state.main
        probes = main.plan_probes(filters, k, nprobe)
        allowed = torch.empty(batch, (len(main) + 63) // 64, dtype=torch.int64)
        for expr in dict.fromkeys(filters):
            allowed[[i for i, f in enumerate(filters) if f == expr]] = main.filter_words(expr)
        if state.alive is not None:
            allowed &= state.alive
        excluded = self._excluded_rows(exclude, batch)  # [B, E]
        query, slot = torch.nonzero(excluded >= 0, as_tuple=True)
        row = excluded[query, slot]
        clear = torch.zeros_like(allowed)  # distinct bits per (query, word): their sum is their OR
        clear.index_put_((query, row >> 6), torch.ones_like(row) << (row & 63), accumulate=True)
        allowed &= ~clear
        return QueryPlan(probes, allowed)

    def executor_tensors(self) -> dict[str, torch.Tensor]:
        """The static inputs of the tensor-only search over the main segment
        (:meth:`~sterling.index.segment.Segment.executor_tensors`): ``centroids``, ``row_list``,
        ``codes``, ``scales`` and ``ids`` (the external id of every row)."""
        return self._state.main.executor_tensors()

    def upsert(
        self,
        ids: torch.Tensor | np.ndarray | Sequence[int],
        embeddings: torch.Tensor | np.ndarray,
        attributes: Sequence[Mapping[str, Any]],
        table: torch.Tensor | None = None,
    ) -> None:
        """Inserts items, replacing those whose id already exists; visible to the next search.
        Each item takes a new row (the embedding quantized once); a replaced item's old row is
        tombstoned.

        Args:
            ids (torch.Tensor | np.ndarray | Sequence[int]): int64 [M], unique.
            embeddings (torch.Tensor | np.ndarray): float [M, D].
            attributes (Sequence[Mapping[str, Any]]): M dicts over the index's features; values
                new to a vocabulary extend it, an unknown feature is a ValueError.
            table (torch.Tensor | None): [M, S], the items' item table rows: required when the
                index holds a table (:meth:`set_table`), refused otherwise.
        """
        new_ids = _item_ids(ids)
        emb = _as_matrix(embeddings, "embeddings")
        if len(new_ids) != emb.shape[0]:
            raise ValueError(f"got {len(new_ids)} ids for {emb.shape[0]} embeddings")
        _check_unique(new_ids)
        _check_attribute_count(attributes, len(new_ids))
        if emb.shape[1] != self.dim:
            raise ValueError(f"embeddings have dimension {emb.shape[1]}, the index has {self.dim}")
        with self._lock:
            state = self._state
            if (table is None) != (state.table is None):
                raise ValueError(
                    "the index holds an item table: give each item its table row"
                    if table is None
                    else "the index holds no item table (set_table) for the given rows"
                )
            if table is not None and (table.dim() != 2 or table.shape != (len(new_ids), state.table.shape[1])):
                raise ValueError(
                    f"table rows must be [{len(new_ids)}, {state.table.shape[1]}], got {list(table.shape)}"
                )
            state, _ = _without(state, new_ids)
            fresh = state.fresh.appended(new_ids, quantize(emb), attributes, table)
            self._state = replace(state, fresh=fresh)
            if len(fresh.ids) >= self._config.compact_at:
                self._state = _compacted(self._state, self._config)

    def delete(self, ids: torch.Tensor | np.ndarray | Sequence[int]) -> int:
        """Removes items by external id, visible to the next search; unknown ids are ignored.

        Returns:
            int: the number of items removed.
        """
        gone = _as_ids(ids, "ids")
        with self._lock:
            self._state, removed = _without(self._state, gone)
            return removed

    def compact(self) -> None:
        """Folds the fresh items into the main segment and drops deleted rows (searches keep
        running on the previous state meanwhile)."""
        with self._lock:
            self._state = _compacted(self._state, self._config)

    def shard(self, keep: torch.Tensor) -> ItemIndex:
        """The index of the items where ``keep`` (bool ``[N]`` over :attr:`ids`) is true, for an
        item-sharded deployment: the same centroids, each item in the same list with the same int8
        code, so a shard's search is the whole index's restricted to its items (with every list
        probed, the shards' merged top-k is the whole index's). Needs a compacted index."""
        state = self._state
        if state.alive is not None or len(state.fresh.ids):
            raise ValueError("shard a compacted index (no fresh or deleted items): compact() it first")
        main = state.main
        keep = torch.as_tensor(keep, dtype=torch.bool)
        if keep.shape != (len(main),):
            raise ValueError(f"keep must be bool [{len(main)}], got {list(keep.shape)}")
        rows = torch.nonzero(keep).view(-1)  # ascending: IVF order kept
        offsets = torch.searchsorted(rows, main.list_offsets)  # kept rows before each list start
        segment = Segment.from_sorted(
            main.codes.take(rows),
            main.ids[rows],
            main.centroids,
            offsets,
            main.attributes.take(rows),
            self._config,
        )
        table = None if state.table is None else state.table[rows]
        return ItemIndex(_State(segment, None, _empty_fresh(segment, table), table), self._config)

    def to_snapshot_parts(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The index as JSON metadata and named tensors, for embedding in a larger snapshot."""
        state = self._state
        main, fresh = state.main, state.fresh.kept(torch.nonzero(state.fresh.live).view(-1))
        meta = {
            "format": _FORMAT,
            "config": self._config.to_json(),
            "num_items": len(main),
            "num_fresh": len(fresh.ids),
            "dim": self.dim,
            "attributes": main.attributes.meta(),
            "bloom": main.bloom.meta(),
            "fresh_attributes": fresh.attributes.meta(),
        }
        tensors = {
            "codes": main.codes.codes,
            "scales": main.codes.scales,
            "ids": main.ids,
            "centroids": main.centroids,
            "list_offsets": main.list_offsets,
            "alive": pack_rows(torch.ones(len(main), dtype=torch.bool)) if state.alive is None else state.alive,
            "fresh.ids": fresh.ids,
            "fresh.codes": fresh.codes.codes,
            "fresh.scales": fresh.codes.scales,
        }
        tensors.update({f"attr.{k}": v for k, v in main.attributes.to_tensors().items()})
        tensors.update({f"bloom.{k}": v for k, v in main.bloom.to_tensors().items()})
        tensors.update({f"fresh_attr.{k}": v for k, v in fresh.attributes.to_tensors().items()})
        return meta, tensors

    @classmethod
    def from_snapshot_parts(cls, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> ItemIndex:
        """Rebuilds an index from :meth:`to_snapshot_parts`, checking shapes and dtypes."""
        try:
            if meta["format"] != _FORMAT:
                raise ValueError(f"unsupported item index format {meta['format']!r} (this build reads {_FORMAT})")
            config = IndexConfig(**meta["config"])
            n, f, d = int(meta["num_items"]), int(meta["num_fresh"]), int(meta["dim"])
            nlist = tensors["centroids"].shape[0]
            _check_part(tensors, "codes", torch.int8, (n, d))
            _check_part(tensors, "scales", torch.float32, (n,))
            _check_part(tensors, "ids", torch.int64, (n,))
            _check_part(tensors, "centroids", torch.float32, (nlist, d))
            _check_part(tensors, "list_offsets", torch.int64, (nlist + 1,))
            _check_part(tensors, "alive", torch.int64, ((n + 63) // 64,))
            _check_part(tensors, "fresh.ids", torch.int64, (f,))
            _check_part(tensors, "fresh.codes", torch.int8, (f, d))
            _check_part(tensors, "fresh.scales", torch.float32, (f,))
            offsets = tensors["list_offsets"]
            if nlist < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != n or bool((offsets.diff() < 0).any()):
                raise ValueError(f"list_offsets must rise from 0 to {n}")
            attributes = AttributeStore.from_parts(meta["attributes"], _prefixed(tensors, "attr."))
            bloom = BloomIndex.from_parts(meta["bloom"], _prefixed(tensors, "bloom."))
            fresh_attributes = AttributeStore.from_parts(meta["fresh_attributes"], _prefixed(tensors, "fresh_attr."))
        except (KeyError, TypeError) as e:
            raise ValueError(f"item index snapshot parts are malformed: {e!r}") from None
        if len(attributes) != n or len(bloom) != n or len(fresh_attributes) != f:
            raise ValueError("attribute store, Bloom index and codes disagree on the number of items")
        ids = tensors["ids"]
        fresh_ids = tensors["fresh.ids"]
        _check_unique(torch.cat([ids, fresh_ids]))
        main = Segment.from_sorted(
            Int8Codes(tensors["codes"], tensors["scales"]),
            ids,
            tensors["centroids"],
            offsets,
            attributes,
            config,
            bloom,
        )
        alive = tensors["alive"]
        full = bool((alive == pack_rows(torch.ones(n, dtype=torch.bool))).all())
        fresh = _Fresh(
            fresh_ids,
            Int8Codes(tensors["fresh.codes"], tensors["fresh.scales"]),
            fresh_attributes,
            torch.ones(f, dtype=torch.bool),
            IdMap.build(fresh_ids),
            None,
        )
        state = _State(main, None if full else alive, fresh, None)
        if not full:  # a deleted main row may not hold an id a fresh item also holds
            _check_unique(torch.cat([main.ids[state.live_rows], fresh_ids]))
        return cls(state, config)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the index as a snapshot directory, atomically (``sterling.snapshot``)."""
        meta, tensors = self.to_snapshot_parts()
        return write_snapshot(path, {_SNAPSHOT_FILE: tensors}, {_SNAPSHOT_META: meta})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ItemIndex:
        """Loads an index saved by :meth:`save`, refusing a snapshot that fails verification."""
        snapshot = read_snapshot(path)
        if _SNAPSHOT_META not in snapshot.meta or _SNAPSHOT_FILE not in snapshot.tensors:
            raise SnapshotError(f"snapshot {path} holds no item index")
        return cls.from_snapshot_parts(snapshot.meta[_SNAPSHOT_META], snapshot.tensors[_SNAPSHOT_FILE])


def _empty_fresh(main: Segment, table: torch.Tensor | None) -> _Fresh:
    d = main.centroids.shape[1]
    none = torch.zeros(0, dtype=torch.int64)
    return _Fresh(
        none,
        Int8Codes(torch.zeros(0, d, dtype=torch.int8), torch.zeros(0)),
        main.attributes.take(none),
        torch.zeros(0, dtype=torch.bool),
        IdMap.build(none),
        None if table is None else table[:0],
    )


def _locate(state: _State, ids: torch.Tensor) -> torch.Tensor:
    """int64 [M]: the row of each live item of ``ids``; unknown or deleted ids are a ValueError."""
    rows, found = state.rows_of(ids)
    missing = ~found
    missing[found] = ~state.live(rows[found])
    if bool(missing.any()):
        raise ValueError(f"unknown ids: {ids[missing][:10].tolist()}")
    return rows


def _without(state: _State, ids: torch.Tensor) -> tuple[_State, int]:
    """The state with ``ids`` removed (their rows tombstoned; the rows stay until compaction) and
    how many live items that removed."""
    rows, found = state.rows_of(ids)
    rows = rows[found]
    rows = rows[state.live(rows)].unique()
    if not len(rows):
        return state, 0
    n = len(state.main)
    main_rows, fresh_rows = rows[rows < n], rows[rows >= n] - n
    alive = state.alive
    if len(main_rows):
        dead = torch.zeros(n, dtype=torch.bool)
        dead[main_rows] = True
        alive = (pack_rows(torch.ones(n, dtype=torch.bool)) if alive is None else alive) & ~pack_rows(dead)
    fresh = state.fresh
    if len(fresh_rows):
        live = fresh.live.clone()
        live[fresh_rows] = False
        fresh = replace(fresh, live=live)
    return replace(state, alive=alive, fresh=fresh), len(rows)


def _compacted(state: _State, config: IndexConfig) -> _State:
    """One main segment holding every live item: live main rows and live fresh rows, each assigned
    to its nearest existing centroid (k-means again when the catalogue outgrew the lists); the
    item table follows its rows."""
    main, fresh, live = state.main, state.fresh, state.live_rows
    if state.alive is None and not len(fresh.ids):
        return state
    fresh = fresh.kept(torch.nonzero(fresh.live).view(-1))
    codes = Int8Codes(
        torch.cat([main.codes.codes[live], fresh.codes.codes]), torch.cat([main.codes.scales[live], fresh.codes.scales])
    )
    ids = torch.cat([main.ids[live], fresh.ids])
    attributes = main.attributes.take(live).append(fresh.attributes.decode(range(len(fresh.ids))))
    vectors = dequantize(codes)  # re-quantizing these gives the same codes
    recluster = config.nlist is None and auto_nlist(len(ids)) >= 2 * main.nlist
    segment = Segment.build(vectors, attributes, ids, config, centroids=None if recluster else main.centroids)
    table = None
    if state.table is not None:
        before = torch.cat([state.table[live], fresh.table])
        table = before[IdMap.build(ids).lookup(segment.ids)[0]]  # each row's table row follows its item
    return _State(segment, None, _empty_fresh(segment, table), table)


def _search_fresh(
    state: _State, q: torch.Tensor, filters: list[str | None], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact filtered top-k over the live fresh rows: scores float32 [B, k], fresh rows int64 [B, k].
    Each filter is the one the main segment parsed and compiled (cached), not parsed again."""
    fresh = state.fresh
    b = q.shape[0]
    scores = torch.full((b, k), float("-inf"))
    rows = torch.full((b, k), -1, dtype=torch.int64)
    vectors = dequantize(fresh.codes)
    for expr in dict.fromkeys(filters):
        group = torch.tensor([i for i, f in enumerate(filters) if f == expr])
        mask = (
            fresh.live if expr is None else fresh.live & fresh.attributes.evaluate(state.main.compiled(expr).node, expr)
        )
        scores[group], rows[group] = filtered_topk(q[group], vectors, mask, k)
    return scores, rows


def _prefixed(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _check_part(tensors: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = tensors[name]
    if t.dtype != dtype or tuple(t.shape) != shape:
        short = str(dtype).removeprefix("torch.")
        raise ValueError(
            f"{name} should be {short} {list(shape)}, got {str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
        )


def _as_matrix(x: Any, name: str, allow_vector: bool = False) -> torch.Tensor:
    """float32 [M, D], an owned copy of ``x`` (detached: search is not differentiable), checked to
    be floating point and finite."""
    t = torch.as_tensor(x).detach()
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if allow_vector and t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[1] == 0:
        want = "[B, D] or [D]" if allow_vector else "[N, D]"
        raise ValueError(f"{name} must have shape {want} with D >= 1, got {list(t.shape)}")
    t = t.to(torch.float32, copy=True).contiguous()
    bad = ~torch.isfinite(t).all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"{name} contain NaN or inf (row {int(bad.nonzero()[0])})")
    return t


def _item_ids(x: Any) -> torch.Tensor:
    """int64 [M] ids of items to store; -1 is refused: results use it for an empty slot."""
    ids = _as_ids(x, "ids")
    if bool((ids == -1).any()):
        raise ValueError("item id -1 is reserved: search results use it for an empty slot")
    return ids


def _as_ids(x: Any, name: str) -> torch.Tensor:
    """int64 [M] from an integer tensor, array or sequence."""
    t = torch.as_tensor(x)
    if t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise ValueError(f"{name} must be integers, got {t.dtype}")  # an empty list reads as float
    if t.dim() != 1:
        raise ValueError(f"{name} must have shape [M], got {list(t.shape)}")
    return t.to(torch.int64, copy=True)


def _check_unique(ids: torch.Tensor) -> None:
    sorted_ids = torch.sort(ids).values
    dup = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
    if len(dup):
        raise ValueError(f"ids must be unique; id {int(dup[0])} appears more than once")


def _check_attribute_count(attributes: Sequence[Mapping[str, Any]], n: int) -> None:
    if not isinstance(attributes, Sequence) or isinstance(attributes, (str, bytes)):
        raise ValueError(f"attributes must be a list of {n} dicts, got {type(attributes).__name__}")
    if len(attributes) != n:
        raise ValueError(f"got {len(attributes)} attribute dicts for {n} embeddings")


def _check_k_nprobe(k: Any, nprobe: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if nprobe is not None and (isinstance(nprobe, bool) or not isinstance(nprobe, int) or nprobe < 1):
        raise ValueError(f"nprobe must be None or an int >= 1, got {nprobe!r}")


def _filters(filter: str | Sequence[str | None] | None, b: int) -> list[str | None]:
    """One filter expression (or None) per query."""
    if filter is None or isinstance(filter, str):
        return [filter] * b
    if not isinstance(filter, Sequence) or len(filter) != b:
        got = f"{len(filter)} filters" if isinstance(filter, Sequence) else type(filter).__name__
        raise ValueError(f"filter must be None, a str or a list of {b} str (one per query), got {got}")
    for row, expr in enumerate(filter):
        if expr is not None and not isinstance(expr, str):
            raise ValueError(f"filter {row} must be a str or None, got {type(expr).__name__}")
    return list(filter)
