"""ItemIndex: item embeddings and attributes, searched by inner product under an exact filter.

This is the exact (brute-force) index: every passing item is scored, so results are the true
filtered top-k. State (ids, embeddings, attributes) lives in one immutable object; ``upsert`` and
``delete`` build a new one and swap the reference under a lock (copy-on-write), and ``search``
reads the reference once, so a search running beside an update sees the old or the new index,
never a mix.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sterling.index.attributes import AttributeStore
from sterling.ops.filtered_topk import filtered_topk
from sterling.serving.snapshot import SnapshotError, read_snapshot, write_snapshot

_SNAPSHOT_FILE = "index"
_SNAPSHOT_META = "item_index"
_ATTR_PREFIX = "attr."


@dataclass(frozen=True)
class IndexConfig:
    """Configuration of an :class:`ItemIndex`.

    Args:
        block_size (int): items scored at a time during search; memory is O(B * (block_size + k)).
    """

    block_size: int = 65536

    def __post_init__(self) -> None:
        if (
            isinstance(self.block_size, bool)
            or not isinstance(self.block_size, int)
            or self.block_size < 1
        ):
            raise ValueError(f"block_size must be an int >= 1, got {self.block_size!r}")


@dataclass(frozen=True)
class SearchResult:
    """Top-k results of a batch of B queries.

    Args:
        ids (torch.Tensor): int64 [B, k], external item ids, -1 where fewer than k items pass.
        scores (torch.Tensor): float32 [B, k], inner products, descending, -inf where ids is -1.
    """

    ids: torch.Tensor
    scores: torch.Tensor


@dataclass(frozen=True)
class _State:
    """One immutable version of the index: row r is item ``ids[r]``."""

    ids: torch.Tensor  # int64 [N]
    embeddings: torch.Tensor  # float32 [N, D]
    attributes: AttributeStore  # N items

    @functools.cached_property
    def _id_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows sorting ``ids``, the sorted ids), computed once per state."""
        order = torch.argsort(self.ids)
        return order, self.ids[order]

    def rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 [M]: the rows of external ``ids`` (int64 [M]); unknown ids are a ValueError."""
        order, sorted_ids = self._id_order
        pos = torch.searchsorted(sorted_ids, ids)
        inside = pos < len(sorted_ids)
        found = torch.zeros_like(inside)
        found[inside] = sorted_ids[pos[inside]] == ids[inside]
        if not bool(found.all()):
            raise ValueError(f"unknown ids: {ids[~found][:10].tolist()}")
        return order[pos]


class ItemIndex:
    """A searchable set of N items with D-dimensional embeddings and attribute dicts.

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
        """Builds an index.

        Args:
            embeddings (torch.Tensor | np.ndarray): float [N, D], finite; stored as float32.
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
        ids_ = torch.arange(n) if ids is None else _as_ids(ids, "ids")
        if len(ids_) != n:
            raise ValueError(f"got {len(ids_)} ids for {n} embeddings")
        _check_unique(ids_)
        _check_attribute_count(attributes, n)
        return cls(_State(ids_, emb, AttributeStore.build(attributes)), config)

    def __len__(self) -> int:
        return len(self._state.ids)

    def nbytes(self) -> int:
        """Bytes held by the index: ids, embeddings and the exact attribute store."""
        state = self._state
        return (
            state.ids.element_size() * state.ids.numel()
            + state.embeddings.element_size() * state.embeddings.numel()
            + state.attributes.nbytes()
        )

    @property
    def dim(self) -> int:
        """D, the embedding dimension."""
        return self._state.embeddings.shape[1]

    @property
    def config(self) -> IndexConfig:
        return self._config

    @property
    def ids(self) -> torch.Tensor:
        """int64 [N]: the external ids, in row order (a copy)."""
        return self._state.ids.clone()

    def attributes_of(self, ids: torch.Tensor | np.ndarray | Sequence[int]) -> list[dict[str, Any]]:
        """The attribute dicts of external ``ids`` (int64 [M]); unknown ids are a ValueError."""
        state = self._state
        return state.attributes.decode(state.rows_of(_as_ids(ids, "ids")))

    def embeddings_of(self, ids: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
        """float32 [M, D]: the embeddings of external ``ids``; unknown ids are a ValueError."""
        state = self._state
        return state.embeddings[state.rows_of(_as_ids(ids, "ids"))]

    def search(
        self,
        queries: torch.Tensor | np.ndarray,
        k: int = 100,
        filter: str | Sequence[str | None] | None = None,
        nprobe: int | None = None,
    ) -> SearchResult:
        """Exact filtered top-k by inner product.

        Args:
            queries (torch.Tensor | np.ndarray): float [B, D] or [D] (then B = 1).
            k (int): results per query, k >= 1.
            filter (str | Sequence[str | None] | None): one filter expression for every query, a
                list of B expressions (None for no filter), or None. Identical expressions are
                evaluated once and their queries searched together.
            nprobe (int | None): accepted for compatibility with approximate indexes and ignored:
                this index scores every passing item.

        Returns:
            SearchResult: ids int64 [B, k] and scores float32 [B, k]; where fewer than k items
            pass a query's filter, its tail holds id -1 and score -inf.

        Raises:
            FilterError: a malformed filter or an unknown feature, with its position.
            ValueError: wrong query shape, dtype, non-finite values, or a bad k, filter or nprobe.
        """
        state = self._state
        q = _as_matrix(queries, "queries", allow_vector=True)
        if q.shape[1] != state.embeddings.shape[1]:
            raise ValueError(
                f"queries have dimension {q.shape[1]}, the index has {state.embeddings.shape[1]}"
            )
        if nprobe is not None and (
            isinstance(nprobe, bool) or not isinstance(nprobe, int) or nprobe < 1
        ):
            raise ValueError(f"nprobe must be None or an int >= 1, got {nprobe!r}")
        b = q.shape[0]
        parts = [
            (
                group,
                filtered_topk(
                    q[group],
                    state.embeddings,
                    None if expr is None else state.attributes.evaluate_filter(expr),
                    k,
                    block=self._config.block_size,
                ),
            )
            for expr, group in _group_by_filter(filter, b).items()
        ]
        scores = torch.empty(b, k)  # k was validated by filtered_topk
        rows = torch.empty(b, k, dtype=torch.int64)
        for group, (group_scores, group_rows) in parts:
            scores[group], rows[group] = group_scores, group_rows
        ids = torch.full_like(rows, -1)
        found = rows >= 0
        ids[found] = state.ids[rows[found]]
        return SearchResult(ids, scores)

    def upsert(
        self,
        ids: torch.Tensor | np.ndarray | Sequence[int],
        embeddings: torch.Tensor | np.ndarray,
        attributes: Sequence[Mapping[str, Any]],
    ) -> None:
        """Inserts items, replacing those whose id already exists.

        Args:
            ids (torch.Tensor | np.ndarray | Sequence[int]): int64 [M], unique.
            embeddings (torch.Tensor | np.ndarray): float [M, D].
            attributes (Sequence[Mapping[str, Any]]): M dicts over the index's features; values
                new to a vocabulary extend it, an unknown feature is a ValueError.
        """
        new_ids = _as_ids(ids, "ids")
        emb = _as_matrix(embeddings, "embeddings")
        if len(new_ids) != emb.shape[0]:
            raise ValueError(f"got {len(new_ids)} ids for {emb.shape[0]} embeddings")
        _check_unique(new_ids)
        _check_attribute_count(attributes, len(new_ids))
        with self._lock:
            state = self._state
            if emb.shape[1] != state.embeddings.shape[1]:
                raise ValueError(
                    f"embeddings have dimension {emb.shape[1]}, "
                    f"the index has {state.embeddings.shape[1]}"
                )
            keep = torch.nonzero(~torch.isin(state.ids, new_ids)).squeeze(1)
            self._state = _State(
                torch.cat([state.ids[keep], new_ids]),
                torch.cat([state.embeddings[keep], emb]),
                state.attributes.take(keep).append(attributes),
            )

    def delete(self, ids: torch.Tensor | np.ndarray | Sequence[int]) -> int:
        """Removes items by external id; ids not in the index are ignored.

        Returns:
            int: the number of items removed.
        """
        gone = _as_ids(ids, "ids")
        with self._lock:
            state = self._state
            keep = torch.nonzero(~torch.isin(state.ids, gone)).squeeze(1)
            removed = len(state.ids) - len(keep)
            if removed:
                self._state = _State(
                    state.ids[keep], state.embeddings[keep], state.attributes.take(keep)
                )
            return removed

    def to_snapshot_parts(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The index as JSON metadata and named tensors, for embedding in a larger snapshot."""
        state = self._state
        meta = {
            "config": dataclasses.asdict(self._config),
            "num_items": len(state.ids),
            "dim": state.embeddings.shape[1],
            "attributes": state.attributes.meta(),
        }
        tensors = {"ids": state.ids, "embeddings": state.embeddings}
        tensors.update({_ATTR_PREFIX + k: v for k, v in state.attributes.to_tensors().items()})
        return meta, tensors

    @classmethod
    def from_snapshot_parts(
        cls, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
    ) -> ItemIndex:
        """Rebuilds an index from :meth:`to_snapshot_parts`, checking shapes and dtypes."""
        try:
            config = IndexConfig(**meta["config"])
            n, d = int(meta["num_items"]), int(meta["dim"])
            ids, emb = tensors["ids"], tensors["embeddings"]
            attr_meta = meta["attributes"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"item index snapshot parts are malformed: {e!r}") from None
        if ids.dtype != torch.int64 or ids.shape != (n,):
            raise ValueError(f"ids should be int64 [{n}], got {ids.dtype} {list(ids.shape)}")
        if emb.dtype != torch.float32 or emb.shape != (n, d):
            raise ValueError(
                f"embeddings should be float32 [{n}, {d}], got {emb.dtype} {list(emb.shape)}"
            )
        _check_unique(ids)
        attributes = AttributeStore.from_parts(
            attr_meta,
            {k[len(_ATTR_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_ATTR_PREFIX)},
        )
        if len(attributes) != n:
            raise ValueError(f"attributes hold {len(attributes)} items, embeddings {n}")
        return cls(_State(ids, emb, attributes), config)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the index as a snapshot directory, atomically (``sterling.serving.snapshot``)."""
        meta, tensors = self.to_snapshot_parts()
        return write_snapshot(path, {_SNAPSHOT_FILE: tensors}, {_SNAPSHOT_META: meta})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ItemIndex:
        """Loads an index saved by :meth:`save`, refusing a snapshot that fails verification."""
        snapshot = read_snapshot(path)
        if _SNAPSHOT_META not in snapshot.meta or _SNAPSHOT_FILE not in snapshot.tensors:
            raise SnapshotError(f"snapshot {path} holds no item index")
        return cls.from_snapshot_parts(
            snapshot.meta[_SNAPSHOT_META], snapshot.tensors[_SNAPSHOT_FILE]
        )


def _as_matrix(x: Any, name: str, allow_vector: bool = False) -> torch.Tensor:
    """float32 [M, D], an owned copy of ``x``, checked to be floating point and finite."""
    t = torch.as_tensor(x)
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


def _group_by_filter(
    filter: str | Sequence[str | None] | None, b: int
) -> dict[str | None, torch.Tensor]:
    """Filter expression -> the query rows (int64) that use it."""
    if filter is None or isinstance(filter, str):
        return {filter: torch.arange(b)}
    if not isinstance(filter, Sequence) or len(filter) != b:
        got = f"{len(filter)} filters" if isinstance(filter, Sequence) else type(filter).__name__
        raise ValueError(
            f"filter must be None, a str or a list of {b} str (one per query), got {got}"
        )
    groups: dict[str | None, list[int]] = {}
    for row, expr in enumerate(filter):
        if expr is not None and not isinstance(expr, str):
            raise ValueError(f"filter {row} must be a str or None, got {type(expr).__name__}")
        groups.setdefault(expr, []).append(row)
    return {expr: torch.tensor(rows) for expr, rows in groups.items()}
