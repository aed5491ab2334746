"""The rows a served model gained since its snapshot: live item upserts beside the compacted index.

A :class:`~sterling.retrieval.model.RetrievalModel` addresses items by *row*: rows ``[0, N)`` are the
snapshot's main segment (IVF order, the buffers the exported program reads), rows ``[N, N + F)``
are the items upserted since, in arrival order. :class:`FreshRows` holds what the model needs of
those F items (the index keeps their codes and attributes for search): external ids, the int8
codes and scales the index stores (inner products without an OverArch), and their embedding-cache
rows (the history reads and OverArch's item state). It is immutable; an upsert makes the next one,
so a forward reading the old one is never torn.

An id upserted again maps to its newest row (a replaced main-segment item is tombstoned in the
index and read from its fresh row); a deleted item keeps its rows, since histories may still name it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sterling.index.quant import quantize
from sterling.index.search import find_sorted

__all__ = ["FreshRows", "gather_rows", "item_cache_rows"]


@dataclass(frozen=True)
class FreshRows:
    """F items upserted into a served model, rows ``N + r`` for ``r < F``.

    Attributes:
        ids (torch.Tensor): int64 ``[F]`` external ids (an id upserted twice holds two rows).
        codes (torch.Tensor): int8 ``[F, D]``, the index's codes of the item embeddings.
        scales (torch.Tensor): float32 ``[F]``, their per-item scales.
        cache (torch.Tensor): ``[F, S]`` embedding-cache rows, the main cache's dtype.
        sorted_ids (torch.Tensor): int64 ``[U]`` the distinct ids, ascending.
        newest_row (torch.Tensor): int64 ``[U]`` the newest fresh row ``r`` of each sorted id.
    """

    ids: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    cache: torch.Tensor
    sorted_ids: torch.Tensor
    newest_row: torch.Tensor

    @classmethod
    def empty(cls, dim: int, cache: torch.Tensor) -> FreshRows:
        """No fresh rows, for items of dimension ``dim`` beside a main ``cache [N, S]``."""
        none = torch.zeros(0, dtype=torch.int64)
        return cls(
            none, torch.zeros(0, dim, dtype=torch.int8), torch.zeros(0), cache.new_zeros(0, cache.shape[1]), none, none
        )

    def __len__(self) -> int:
        return len(self.ids)

    def added(self, ids: torch.Tensor, embeddings: torch.Tensor, cache: torch.Tensor) -> FreshRows:
        """The next version with items ``ids int64 [M]`` (distinct) of ``embeddings float32 [M, D]``
        and cache rows ``[M, S]`` appended."""
        q = quantize(embeddings)
        all_ids = torch.cat([self.ids, ids])
        order = torch.argsort(all_ids, stable=True)  # an id's rows in arrival order
        sorted_all = all_ids[order]
        last = torch.ones_like(sorted_all, dtype=torch.bool)
        last[:-1] = sorted_all[1:] != sorted_all[:-1]  # the newest row of each id
        return FreshRows(
            all_ids,
            torch.cat([self.codes, q.codes]),
            torch.cat([self.scales, q.scales]),
            torch.cat([self.cache, cache.to(self.cache.dtype)]),
            sorted_all[last],
            order[last],
        )

    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The newest fresh row ``r`` of each id ``int64 [...]`` (-1 where none) and bool found."""
        return find_sorted(self.sorted_ids, self.newest_row, ids)


def gather_rows(main: torch.Tensor, fresh: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``main [N, ...]`` and ``fresh [F, ...]`` stacked, at ``rows int64 [...]`` (in ``[0, N + F)``),
    without copying either table."""
    if len(fresh) == 0:
        return main[rows]
    n = main.shape[0]
    out = main[rows.clamp(max=n - 1)]
    is_fresh = rows >= n
    out[is_fresh] = fresh[rows[is_fresh] - n]
    return out


def item_cache_rows(
    vectors: torch.Tensor, item_state: Callable[[torch.Tensor], torch.Tensor] | None, dtype: torch.dtype
) -> torch.Tensor:
    """The embedding-cache rows ``dtype [M, S]`` of item-tower outputs ``float [M, D]``: the
    item state (OverArch's ``item_state``; its first ``D`` columns are the embeddings) of the
    embeddings rounded to ``dtype``; without an OverArch, the rounded embeddings (``S = D``)."""
    rounded = vectors.to(dtype).float()
    with torch.no_grad():
        state = rounded if item_state is None else item_state(rounded)
    return state.to(dtype)
