"""IVF probe dispatcher: validates once, then routes to a kernel.

The first step of a search (:mod:`sterling.index.segment`): each query's ``p`` nearest lists, those
whose centroids have the largest inner products with it, the nearest first (the scan's
threshold starts from the nearest lists; the order of the rest does not matter to it).

Kernels: ``Kernel.REFERENCE`` (:mod:`sterling.ops.reference.nearest_lists`: a float matrix product,
a stable descending sort) and ``Kernel.CPU`` (:mod:`sterling.ops.cpu.nearest_lists`: numba, each
query's scores, (score, list) keys and a quickselect on the calling thread and the shared helpers;
the same lists up to the order of the float32 sums). The CPU kernel runs no torch op: a parallel
torch op leaves GNU OpenMP's workers spinning on the cores the scan needs next (see
:mod:`sterling`).
"""

from __future__ import annotations

import torch

from sterling.ops.cpu import nearest_lists as cpu
from sterling.ops.kernel import Kernel, all_finite, host, select
from sterling.ops.reference import nearest_lists as reference

__all__ = ["Kernel", "nearest_lists"]

_KERNELS = {Kernel.REFERENCE: reference.nearest_lists, Kernel.CPU: cpu.nearest_lists}


def nearest_lists(
    queries: torch.Tensor,
    centroids: torch.Tensor,
    p: int,
    counts: torch.Tensor | None = None,
    kernel: Kernel = Kernel.CPU,
) -> torch.Tensor:
    """int64 [B, p]: the lists with the largest ``queries[b] · centroids[c]`` of each query, largest
    first; of equal scores the lower list first.

    Args:
        queries (torch.Tensor): float32 [B, D], finite.
        centroids (torch.Tensor): float32 [C, D], finite: one per list.
        p (int): lists per query, 0 <= p <= C.
        counts (torch.Tensor | None): int64 [B], each in [1, p] (or 0 when p = 0): query b keeps
            only its ``counts[b]`` nearest, the nearest first and the others in any order, then
            -1 (a batch whose queries probe their own number of lists).
        kernel (Kernel): the implementation.

    Raises:
        ValueError: a wrong shape or dtype, a bad ``p`` or ``counts``, non-finite inputs, or
            products that overflow float32.

    Example::

        nearest_lists(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 0.0]]), 2)
        # tensor([[1, 2]])
    """
    if queries.dim() != 2 or queries.dtype != torch.float32:
        raise ValueError(f"queries must be float32 [B, D], got {queries.dtype} {list(queries.shape)}")
    if centroids.dim() != 2 or centroids.dtype != torch.float32 or centroids.shape[1] != queries.shape[1]:
        raise ValueError(
            f"centroids must be float32 [C, D] with D={queries.shape[1]}, got {centroids.dtype} {list(centroids.shape)}"
        )
    if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= centroids.shape[0]:
        raise ValueError(f"p must be an int in [0, {centroids.shape[0]}], got {p!r}")
    if counts is not None:
        if counts.dtype != torch.int64 or counts.shape != (queries.shape[0],):
            raise ValueError(f"counts must be int64 [B={queries.shape[0]}], got {counts.dtype} {list(counts.shape)}")
        if len(counts) and (host(counts).min() < min(p, 1) or host(counts).max() > p):
            raise ValueError(f"counts must lie in [1, p={p}]")
    if not all_finite(queries):
        raise ValueError("queries hold NaN or infinite values")
    if p == 0 or not len(queries):
        return torch.full((queries.shape[0], p), -1, dtype=torch.int64)
    lists, finite = select("nearest_lists", _KERNELS, kernel)(queries, centroids, p, counts)
    if not finite:  # checked on the products: a check of the centroids would cost more than the probe
        raise ValueError("a query · centroid product is not finite: non-finite centroids, or a float32 overflow")
    return lists
