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

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sterling.index.attributes import AttributeStore
from sterling.index.checks import (
    as_ids,
    as_matrix,
    check_attribute_count,
    check_k_nprobe,
    check_unique,
    checked_item_ids,
    filters_per_query,
)
from sterling.index.config import IndexConfig
from sterling.index.parts import state_from_parts, state_to_parts
from sterling.index.quant import Int8Codes, dequantize, quantize
from sterling.index.segment import Segment
from sterling.index.state import IndexState, compacted, empty_fresh, locate, search_fresh, without
from sterling.snapshot import SnapshotError, read_snapshot, write_snapshot

__all__ = ["IndexConfig", "ItemIndex", "QueryPlan", "SearchResult"]

_SNAPSHOT_FILE = "index"
_SNAPSHOT_META = "item_index"


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

    def __init__(self, state: IndexState, config: IndexConfig) -> None:
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
        emb = as_matrix(embeddings, "embeddings")
        n = emb.shape[0]
        ids_ = torch.arange(n) if ids is None else checked_item_ids(ids)
        if len(ids_) != n:
            raise ValueError(f"got {len(ids_)} ids for {n} embeddings")
        check_unique(ids_)
        check_attribute_count(attributes, n)
        store = AttributeStore.build(attributes)
        main = Segment.build(emb, store, ids_, config)
        return cls(IndexState(main, None, empty_fresh(main, None), None), config)

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
        return _ids_of(self._state, rows)

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
            for r in locate(state, as_ids(ids, "ids")).tolist()
        ]

    def embeddings_of(self, ids: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
        """float32 [M, D]: the stored (int8, dequantized) embeddings of external ``ids``; unknown
        ids are a ValueError."""
        return self.vectors(locate(self._state, as_ids(ids, "ids")))

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
        q = as_matrix(queries, "queries", allow_vector=True)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index has {self.dim}")
        check_k_nprobe(k, nprobe)
        filters = filters_per_query(filter, q.shape[0])
        excluded = _excluded_rows(state, exclude, q.shape[0])  # [B, E], -1 padded
        wide = k + excluded.shape[1]  # the best k + E hold the best k not excluded
        scores, rows, records = state.main.search(q, filters, wide, nprobe, state.alive)
        if len(state.fresh.ids):
            fresh_scores, fresh_rows = search_fresh(state, q, filters, wide)
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
        return SearchResult(_ids_of(state, rows), scores, rows, records if explain else None)

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
        check_k_nprobe(k, nprobe)
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 0):
            raise ValueError(f"batch must be None or an int >= 0, got {batch!r}")
        if batch is None:
            batch = len(filter) if isinstance(filter, Sequence) and not isinstance(filter, str) else 1
        filters = filters_per_query(filter, batch)
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
        excluded = _excluded_rows(state, exclude, batch)  # [B, E]
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
        new_ids = checked_item_ids(ids)
        emb = as_matrix(embeddings, "embeddings")
        if len(new_ids) != emb.shape[0]:
            raise ValueError(f"got {len(new_ids)} ids for {emb.shape[0]} embeddings")
        check_unique(new_ids)
        check_attribute_count(attributes, len(new_ids))
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
            state, _ = without(state, new_ids)
            fresh = state.fresh.appended(new_ids, quantize(emb), attributes, table)
            self._state = replace(state, fresh=fresh)
            if len(fresh.ids) >= self._config.compact_at:
                self._state = compacted(self._state, self._config)

    def delete(self, ids: torch.Tensor | np.ndarray | Sequence[int]) -> int:
        """Removes items by external id, visible to the next search; unknown ids are ignored.

        Returns:
            int: the number of items removed.
        """
        gone = as_ids(ids, "ids")
        with self._lock:
            self._state, removed = without(self._state, gone)
            return removed

    def compact(self) -> None:
        """Folds the fresh items into the main segment and drops deleted rows (searches keep
        running on the previous state meanwhile)."""
        with self._lock:
            self._state = compacted(self._state, self._config)

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
        return ItemIndex(IndexState(segment, None, empty_fresh(segment, table), table), self._config)

    def to_snapshot_parts(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The index as JSON metadata and named tensors, for embedding in a larger snapshot."""
        return state_to_parts(self._state, self._config)

    @classmethod
    def from_snapshot_parts(cls, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> ItemIndex:
        """Rebuilds an index from :meth:`to_snapshot_parts`, checking shapes and dtypes."""
        return cls(*state_from_parts(meta, tensors))

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


def _ids_of(state: IndexState, rows: torch.Tensor) -> torch.Tensor:
    """int64 [...]: the external id of each row of ``state`` (int64 [...]), -1 where the row is -1."""
    ids = state.gather(state.main.ids, state.fresh.ids, rows.clamp(min=0))  # a new tensor
    ids[rows < 0] = -1
    return ids


def _excluded_rows(state: IndexState, exclude: Sequence[Sequence[int] | None] | None, b: int) -> torch.Tensor:
    """int64 [B, E]: the rows of ``state`` (the one the search reads) holding each query's excluded
    ids (the newest row: older ones are never returned), padded with -1; E = 0 without exclusions.
    A list shared by several queries (a request's T task queries) is looked up once."""
    if exclude is None:
        return torch.zeros(b, 0, dtype=torch.int64)
    if isinstance(exclude, (str, bytes)) or not isinstance(exclude, Sequence) or len(exclude) != b:
        got = f"{len(exclude)} lists" if isinstance(exclude, Sequence) else type(exclude).__name__
        raise ValueError(f"exclude must be None or a list of {b} id lists (one per query), got {got}")
    looked_up: dict[int, torch.Tensor] = {}  # by the list's identity
    per_query = []
    for ids in exclude:
        if id(ids) not in looked_up:
            rows, found = state.rows_of(as_ids([] if ids is None else ids, "excluded ids"))
            looked_up[id(ids)] = rows[found].unique()
        per_query.append(looked_up[id(ids)])
    out = torch.full((b, max((len(r) for r in per_query), default=0)), -1, dtype=torch.int64)
    for i, rows in enumerate(per_query):
        out[i, : len(rows)] = rows
    return out
