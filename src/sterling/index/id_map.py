"""IdMap: external item ids → the index's rows, the one lookup every layer uses.

The index's rows are one space: the main segment's rows ``[0, N)`` (IVF order), then the rows
upserted since the last compaction, ``[N, N + F)`` in arrival order. An id upserted again holds
several rows; the map gives its newest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["IdMap"]


@dataclass(frozen=True)
class IdMap:
    """The newest row of each distinct id.

    Attributes:
        sorted_ids (torch.Tensor): int64 ``[U]``, the distinct ids ascending.
        rows (torch.Tensor): int64 ``[U]``, the row of each.
    """

    sorted_ids: torch.Tensor
    rows: torch.Tensor

    @classmethod
    def build(cls, ids: torch.Tensor, rows: torch.Tensor | None = None) -> IdMap:
        """The map of ``ids`` int64 ``[M]`` held by ``rows`` int64 ``[M]`` (default ``arange(M)``);
        an id listed twice maps to its last row."""
        rows = torch.arange(len(ids)) if rows is None else rows
        order = torch.argsort(ids, stable=True)  # an id's rows in the order given
        sorted_ids = ids[order]
        last = torch.ones_like(sorted_ids, dtype=torch.bool)
        last[:-1] = sorted_ids[1:] != sorted_ids[:-1]
        return cls(sorted_ids[last], rows[order[last]])

    def __len__(self) -> int:
        return len(self.sorted_ids)

    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The row of each of ``ids`` int64 ``[...]`` (-1 where absent) and bool ``[...]`` found."""
        if not len(self.sorted_ids):
            return torch.full_like(ids, -1), torch.zeros_like(ids, dtype=torch.bool)
        pos = torch.searchsorted(self.sorted_ids, ids).clamp(max=len(self.sorted_ids) - 1)
        found = self.sorted_ids[pos] == ids
        return torch.where(found, self.rows[pos], -1), found
