"""The state of an :class:`~sterling.index.item_index.ItemIndex`, one immutable value swapped
atomically: the main segment (IVF order) with its tombstone words, the fresh rows upserted since the
last compaction (int8 codes, exact attributes, searched exactly), and the item table kept per row.
Updates and compaction derive the next state from the last (:func:`without`, :func:`compacted`);
the index rows are one space: main rows ``[0, N)``, then the fresh rows."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from sterling.index.attributes import AttributeStore
from sterling.index.config import IndexConfig, auto_nlist
from sterling.index.id_map import IdMap
from sterling.index.quant import Int8Codes, dequantize
from sterling.index.segment import Segment
from sterling.ops.filtered_topk import filtered_topk
from sterling.ops.kernel import host
from sterling.ops.plan_program import bit_of, pack_rows

__all__ = ["FreshRows", "IndexState", "compacted", "empty_fresh", "locate", "search_fresh", "without"]


@dataclass(frozen=True)
class FreshRows:
    """The rows upserted since the last compaction, rows ``N + r`` of the index (``r < F``), in
    arrival order: append-only until :meth:`ItemIndex.compact`, so a row handed out stays valid (a
    replaced or deleted item's row is cleared in ``live``)."""

    ids: torch.Tensor  # int64 [F]
    codes: Int8Codes  # int8 [F, D], float32 [F]
    attributes: AttributeStore  # F items
    live: torch.Tensor  # bool [F]
    id_map: IdMap  # id → its newest fresh row r
    table: torch.Tensor | None  # [F, S]: the rows' item table rows (ItemIndex.set_table)

    def kept(self, rows: torch.Tensor) -> FreshRows:
        """The fresh rows ``rows`` (int64 [M], ascending) alone, renumbered ``0..M-1``."""
        ids = self.ids[rows]
        table = None if self.table is None else self.table[rows]
        return FreshRows(
            ids, self.codes.take(rows), self.attributes.take(rows), self.live[rows], IdMap.build(ids), table
        )

    def appended(
        self, ids: torch.Tensor, codes: Int8Codes, attributes: Sequence[Mapping[str, Any]], table: torch.Tensor | None
    ) -> FreshRows:
        rows = torch.arange(len(self.ids), len(self.ids) + len(ids))
        merged = IdMap.build(torch.cat([self.id_map.sorted_ids, ids]), torch.cat([self.id_map.rows, rows]))
        return FreshRows(
            torch.cat([self.ids, ids]),
            Int8Codes(torch.cat([self.codes.codes, codes.codes]), torch.cat([self.codes.scales, codes.scales])),
            self.attributes.append(attributes),
            torch.cat([self.live, torch.ones(len(ids), dtype=torch.bool)]),
            merged,
            None if self.table is None else torch.cat([self.table, table.to(self.table.dtype)]),
        )


@dataclass(frozen=True)
class IndexState:
    """One immutable version of the index: rows ``[0, N)`` the main segment, ``[N, N + F)`` fresh."""

    main: Segment
    alive: torch.Tensor | None  # int64 [ceil(N / 64)] live words over main rows; None: all live
    fresh: FreshRows
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
        if not len(fresh):  # numpy's indexing: microseconds fewer than torch's, a search pays it
            return torch.from_numpy(host(main)[host(rows)]) if n else main.new_zeros(*rows.shape, *main.shape[1:])
        out = main[rows.clamp(max=max(n - 1, 0))] if n else fresh.new_zeros(*rows.shape, *fresh.shape[1:])
        is_fresh = rows >= n
        out[is_fresh] = fresh[rows[is_fresh] - n]
        return out

    def __len__(self) -> int:
        return len(self.live_rows) + int(self.fresh.live.sum())


def empty_fresh(main: Segment, table: torch.Tensor | None) -> FreshRows:
    d = main.centroids.shape[1]
    none = torch.zeros(0, dtype=torch.int64)
    return FreshRows(
        none,
        Int8Codes(torch.zeros(0, d, dtype=torch.int8), torch.zeros(0)),
        main.attributes.take(none),
        torch.zeros(0, dtype=torch.bool),
        IdMap.build(none),
        None if table is None else table[:0],
    )


def locate(state: IndexState, ids: torch.Tensor) -> torch.Tensor:
    """int64 [M]: the row of each live item of ``ids``; unknown or deleted ids are a ValueError."""
    rows, found = state.rows_of(ids)
    missing = ~found
    missing[found] = ~state.live(rows[found])
    if bool(missing.any()):
        raise ValueError(f"unknown ids: {ids[missing][:10].tolist()}")
    return rows


def without(state: IndexState, ids: torch.Tensor) -> tuple[IndexState, int]:
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


def compacted(state: IndexState, config: IndexConfig) -> IndexState:
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
    return IndexState(segment, None, empty_fresh(segment, table), table)


def search_fresh(
    state: IndexState, q: torch.Tensor, filters: list[str | None], k: int
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
