"""What a request gives the served model: :class:`UserInputs` (jagged histories as the index's
rows, actions, features) and the checks at its boundary (k, per-query filters, input parsing)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sterling.retrieval.config import ServingConfig

__all__ = ["UserInputs", "check_item_ids", "check_k", "padded", "parse_inputs", "per_query", "per_query_exclude"]


@dataclass(frozen=True)
class UserInputs:
    """A batch of ``B`` requests' user side, as the model reads it.

    Attributes:
        history_rows (torch.Tensor): int64 ``[L]``, the index's rows of the history items (:meth:`ItemIndex.rows_of`), oldest first.
        history_actions (torch.Tensor): int64 ``[L]`` action bitmasks.
        history_offsets (torch.Tensor): int64 ``[B + 1]``.
        features (torch.Tensor): int64 ``[B, F]`` encoded features, in ``ServingConfig.features`` order.
        history_vectors (torch.Tensor | None): float32 ``[L, D]``, the history's cached embeddings
            when they come from elsewhere (the shards of :mod:`sterling.serving.shards`); then
            ``history_rows`` is not read.
        history_ts (torch.Tensor | None): int64 ``[L]`` event times in seconds (HSTU's time bias;
            None: every gap is 0). The two-tower user tower does not read them.
        request_ts (torch.Tensor | None): int64 ``[B]`` the requests' times in seconds: an HSTU
            tower trained with ``query_time = "request"`` measures its query's time gaps from them
            (None: from each history's last event).
    """

    history_rows: torch.Tensor
    history_actions: torch.Tensor
    history_offsets: torch.Tensor
    features: torch.Tensor
    history_vectors: torch.Tensor | None = None
    history_ts: torch.Tensor | None = None
    request_ts: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.history_offsets.shape[0] - 1


def padded(values: torch.Tensor, offsets: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def per_query_exclude(exclude: Sequence[Sequence[int]] | None, b: int, t: int) -> list[Sequence[int]] | None:
    """Each request's excluded ids for its T task queries (request-major), or None."""
    if exclude is None:
        return None
    if isinstance(exclude, (str, bytes)) or len(exclude) != b:
        raise ValueError(f"exclude must be a list of {b} id lists (one per request), got {len(exclude)}")
    return [ids for ids in exclude for _ in range(t)]


def check_k(k: int, k0: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= k0:
        raise ValueError(f"k must be an int in [1, k0 = {k0}], got {k!r}")


def check_item_ids(item_ids: torch.Tensor | Sequence[Sequence[int]], batch_size: int) -> torch.Tensor:
    """int64 ``[B, M]``: the items a ranking request scores, checked against its ``B`` requests."""
    item_ids = torch.as_tensor(item_ids)
    if item_ids.is_floating_point() or item_ids.dim() != 2 or item_ids.shape[0] != batch_size:
        raise ValueError(f"item_ids must be integer [B = {batch_size}, M], got {item_ids.dtype} {list(item_ids.shape)}")
    return item_ids.to(torch.int64)
