"""The checks of :class:`~sterling.index.item_index.ItemIndex`'s public arguments: queries,
ids, attributes, k / nprobe and per-query filter lists, each a ValueError naming what is wrong."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from sterling.ops.kernel import host

__all__ = [
    "as_ids",
    "as_matrix",
    "check_attribute_count",
    "check_k_nprobe",
    "check_unique",
    "checked_item_ids",
    "filters_per_query",
]


def as_matrix(x: Any, name: str, allow_vector: bool = False) -> torch.Tensor:
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
    finite = np.isfinite(host(t)).all(axis=1)  # numpy: microseconds where torch takes tens
    if not finite.all():
        raise ValueError(f"{name} contain NaN or inf (row {int(np.argmin(finite))})")
    return t


def checked_item_ids(x: Any) -> torch.Tensor:
    """int64 [M] ids of items to store; -1 is refused: results use it for an empty slot."""
    ids = as_ids(x, "ids")
    if bool((ids == -1).any()):
        raise ValueError("item id -1 is reserved: search results use it for an empty slot")
    return ids


def as_ids(x: Any, name: str) -> torch.Tensor:
    """int64 [M] from an integer tensor, array or sequence."""
    t = torch.as_tensor(x)
    if t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise ValueError(f"{name} must be integers, got {t.dtype}")  # an empty list reads as float
    if t.dim() != 1:
        raise ValueError(f"{name} must have shape [M], got {list(t.shape)}")
    return t.to(torch.int64, copy=True)


def check_unique(ids: torch.Tensor) -> None:
    sorted_ids = torch.sort(ids).values
    dup = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
    if len(dup):
        raise ValueError(f"ids must be unique; id {int(dup[0])} appears more than once")


def check_attribute_count(attributes: Sequence[Mapping[str, Any]], n: int) -> None:
    if not isinstance(attributes, Sequence) or isinstance(attributes, (str, bytes)):
        raise ValueError(f"attributes must be a list of {n} dicts, got {type(attributes).__name__}")
    if len(attributes) != n:
        raise ValueError(f"got {len(attributes)} attribute dicts for {n} embeddings")


def check_k_nprobe(k: Any, nprobe: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if nprobe is not None and (isinstance(nprobe, bool) or not isinstance(nprobe, int) or nprobe < 1):
        raise ValueError(f"nprobe must be None or an int >= 1, got {nprobe!r}")


def filters_per_query(filter: str | Sequence[str | None] | None, b: int) -> list[str | None]:
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
