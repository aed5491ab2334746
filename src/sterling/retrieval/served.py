"""ServedModel: what the serving process needs of a model, one process's or item-sharded.

:class:`~sterling.retrieval.model.RetrievalModel` (one index) and
:class:`~sterling.serving.shards.ShardedModel` (an ingress over index shards) both implement it;
the service, the server and the benchmarks are written against it alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from sterling.models.overarch import OverArch
from sterling.retrieval.config import ServingConfig
from sterling.retrieval.inputs import UserInputs
from sterling.retrieval.rank import Retrieved, Trace

__all__ = ["ItemCount", "ServedModel"]


class ItemCount(NamedTuple):
    """Live items served, and how many of them were upserted since the last compaction."""

    items: int
    fresh_items: int


@runtime_checkable
class ServedModel(Protocol):
    """A served retrieval model: requests in (:meth:`inputs`), filtered, ranked top-k out."""

    config: ServingConfig
    meta: dict
    overarch: OverArch | None

    @property
    def dim(self) -> int: ...

    def inputs(
        self,
        histories: Sequence[Sequence[int]],
        actions: Sequence[Sequence[int]] | None = None,
        features: Sequence[Mapping[str, int]] | None = None,
    ) -> UserInputs: ...

    def __call__(
        self,
        inputs: UserInputs,
        filter: str | Sequence[str | None] | None = None,
        k: int = 100,
        value: str | None = None,
        trace: Trace | None = None,
        exclude: Sequence[Sequence[int]] | None = None,
    ) -> Retrieved: ...

    def recommend(
        self,
        history: Sequence[int],
        filter: str | None = None,
        k: int = 10,
        actions: Sequence[int] | None = None,
        features: Mapping[str, int] | None = None,
        exclude_seen: bool = False,
    ) -> Retrieved: ...

    def rank(self, inputs: UserInputs, item_ids: torch.Tensor) -> torch.Tensor: ...

    def check_filter(self, expr: str) -> None: ...

    def value_of(self, task_scores: torch.Tensor, value: str | None = None) -> torch.Tensor: ...

    def upsert(
        self,
        ids: torch.Tensor | Sequence[int],
        embeddings: torch.Tensor | None = None,
        attributes: Sequence[Mapping] = (),
    ) -> None: ...

    def delete(self, ids: torch.Tensor | Sequence[int]) -> int: ...

    def size(self) -> ItemCount: ...
