"""ItemTable: the served model's per-item state, keyed by the index's rows.

Each item's cache row ``[S]`` holds its item-tower embedding rounded to the cache dtype (the first
``D`` columns: what the user tower reads for a history item) followed by OverArch's cached item
state (what ranking reads for a candidate); without an OverArch it is the rounded embedding alone
(``S = D``). The rows live in the :class:`~sterling.index.item_index.ItemIndex` as its item table
(:meth:`~sterling.index.item_index.ItemIndex.set_table`), so the index is the one owner of item
rows: an upsert adds an item's code and its cache row in one step, compaction reorders both, and no
second row space, id map or version token exists beside it.

:class:`ItemEncoder` is the item tower the served model keeps for fresh items (SilverTorch's
embedding evaluator): an item upserted with its attributes alone is embedded as :func:`publish
<sterling.retrieval.publish.publish>` embeds an item its checkpoint's catalogue does not hold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from sterling.index.item_index import ItemIndex
from sterling.models.overarch import OverArch
from sterling.models.towers import ItemTerms, ItemTower, TwoTowerConfig

__all__ = ["ItemEncoder", "ItemTable", "cache_rows"]


def cache_rows(vectors: torch.Tensor, overarch: OverArch | None, dtype: torch.dtype) -> torch.Tensor:
    """The cache rows ``dtype [M, S]`` of item-tower outputs ``float [M, D]``: OverArch's item
    state (its first ``D`` columns are the embeddings) of the embeddings rounded to ``dtype``;
    without an OverArch, the rounded embeddings (``S = D``). Ranking gathers these rows instead of
    re-running the item tower."""
    rounded = vectors.to(dtype).float()
    with torch.no_grad():
        state = rounded if overarch is None else overarch.item_state(rounded)
    return state.to(dtype)


class ItemTable:
    """What the served model reads per item, by the index's rows (int64, ``>= 0``).

    Args:
        index (ItemIndex): holds the rows and, as its item table, their cache rows.
        dim (int): ``D``, the embedding width (the history reads the first ``D`` cache columns).
        overarch (OverArch | None): the OverArch whose item state the cache rows hold (None: the
            model has none, its cache rows are the rounded embeddings).
        dtype (torch.dtype): the cache dtype (float16 / bfloat16).
        ranks_by_state (bool): ranking reads the cached item state; False: the index's stored
            vectors (ranking by inner product).
        ranker_dim (int): the request-level ranker's item embedding width ``Dr``: the last ``Dr``
            cache columns (0: no ranker). An upserted item gets zeros there (the ranker embeds
            the ids it was trained on).
    """

    def __init__(
        self,
        index: ItemIndex,
        dim: int,
        overarch: OverArch | None,
        dtype: torch.dtype,
        ranks_by_state: bool,
        ranker_dim: int = 0,
    ) -> None:
        self.index = index
        self.ranker_dim = ranker_dim
        self.dim = dim
        self.overarch = overarch
        self.dtype = dtype
        self.ranks_by_state = ranks_by_state

    def rows_for(self, vectors: torch.Tensor) -> torch.Tensor:
        """The cache rows ``[M, S]`` of new items' embeddings ``float [M, D]`` (:func:`cache_rows`)."""
        rows = cache_rows(vectors, self.overarch, self.dtype)
        return torch.cat([rows, rows.new_zeros(rows.shape[0], self.ranker_dim)], 1)

    def history(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 ``[..., D]``: the cached embeddings of ``rows [...]`` (what the user tower reads)."""
        return self.index.table_rows(rows, self.dim).float()

    def ranker_items(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 ``[..., Dr]``: the ranker's item embeddings of ``rows [...]``."""
        return self.index.table_rows(rows)[..., -self.ranker_dim :].float()

    def state(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 ``[..., S]``: what ranking reads of candidate ``rows [...]``: the cached OverArch
        item state, or without an OverArch the index's stored vectors (``S = D``)."""
        if not self.ranks_by_state:
            return self.index.vectors(rows)
        return self.index.table_rows(rows).float()

    def states_of(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 ``[..., S]``: :meth:`state` where ``rows >= 0``, 0 where a slot is empty (-1)."""
        found = rows >= 0
        state = self.state(rows[found])  # [F, S]
        out = state.new_zeros(*rows.shape, state.shape[-1])
        out[found] = state
        return out


class ItemEncoder:
    """The two-tower item tower over attributes alone: embeddings of *cold* items, those the
    checkpoint's id table does not hold. An item's id embedding is zero and its attribute terms
    (one per ``feature=value``) outside the trained vocabulary are dropped (``ItemTerms.build``),
    so an item is embedded from the terms it shares with the catalogue the tower was trained on.

    Args:
        tower (ItemTower): its term table and MLP are read (never its id table).
        vocab (tuple[str, ...]): the attribute-term vocabulary the tower was trained with.
    """

    PREFIX = "item_tower."

    def __init__(self, tower: ItemTower, vocab: Sequence[str]) -> None:
        self.tower = tower.eval()
        self.vocab = tuple(vocab)

    @property
    def dim(self) -> int:
        return self.tower.mlp[-1].out_features

    @torch.no_grad()
    def __call__(self, attributes: Sequence[Mapping]) -> torch.Tensor:
        """float32 ``[M, D]``: the L2-normalised embeddings of ``M`` items' attribute dicts."""
        return self.tower.cold(ItemTerms.build(list(attributes), vocab=self.vocab)).float()

    def weights(self) -> dict[str, torch.Tensor]:
        """What a snapshot carries (under :attr:`PREFIX`): the term table and the MLP, not the
        ``[N, H]`` id table."""
        return {
            f"{self.PREFIX}{k}": v.detach()
            for k, v in self.tower.state_dict().items()
            if k.startswith(("terms.", "mlp."))
        }

    @classmethod
    def from_weights(
        cls, towers: TwoTowerConfig, vocab: Sequence[str], weights: Mapping[str, torch.Tensor]
    ) -> ItemEncoder:
        """The encoder of a snapshot's :meth:`weights` (``weights`` may hold other modules' too)."""
        tower = ItemTower(replace(towers, num_items=0))  # no id table: every item is cold
        found = {k[len(cls.PREFIX) :]: v for k, v in weights.items() if k.startswith(cls.PREFIX)}
        tower.load_state_dict({**found, "ids.weight": tower.ids.weight.detach()})
        return cls(tower, vocab)
