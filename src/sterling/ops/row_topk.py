"""Top-k columns of each row dispatcher: validates once, then routes to a kernel.

The IVF probe of a search (:mod:`sterling.index.segment`): each query's ``p`` nearest lists, from
the [B, nlist] matrix of its scores against the centroids, nearest first (the scan runs each
query's nearest list before the others; the order of the rest does not matter to it).

Kernels: ``Kernel.REFERENCE`` (:mod:`sterling.ops.reference.row_topk`: a stable descending sort)
and ``Kernel.CPU`` (:mod:`sterling.ops.cpu.row_topk`: (score, column) keys, quickselect, a sort of
the k selected; the same columns).
"""

from __future__ import annotations

import torch

from sterling.ops.cpu import row_topk as cpu
from sterling.ops.kernel import Kernel, all_finite, host, select
from sterling.ops.reference import row_topk as reference

__all__ = ["Kernel", "row_topk"]

_KERNELS = {Kernel.REFERENCE: reference.row_topk, Kernel.CPU: cpu.row_topk}


def row_topk(
    scores: torch.Tensor, k: int, counts: torch.Tensor | None = None, kernel: Kernel = Kernel.CPU
) -> torch.Tensor:
    """int64 [B, k]: the columns of the k largest scores of each row, largest first; of equal
    scores the lower column first.

    Args:
        scores (torch.Tensor): float32 [B, C], finite.
        k (int): columns per row, 0 <= k <= C.
        counts (torch.Tensor | None): int64 [B], each in [1, k] (or 0 when k = 0): row b keeps
            only its ``counts[b]`` largest, the largest first and the others in any order, then
            -1 (no sort: the probe of a batch whose queries probe their own number of lists).
        kernel (Kernel): the implementation.

    Example::

        row_topk(torch.tensor([[0.1, 0.9, 0.5]]), 2)  # tensor([[1, 2]])
    """
    if scores.dim() != 2 or scores.dtype != torch.float32:
        raise ValueError(f"scores must be float32 [B, C], got {scores.dtype} {list(scores.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= scores.shape[1]:
        raise ValueError(f"k must be an int in [0, {scores.shape[1]}], got {k!r}")
    if counts is not None:
        if counts.dtype != torch.int64 or counts.shape != (scores.shape[0],):
            raise ValueError(f"counts must be int64 [B={scores.shape[0]}], got {counts.dtype} {list(counts.shape)}")
        if len(counts) and (host(counts).min() < min(k, 1) or host(counts).max() > k):
            raise ValueError(f"counts must lie in [1, k={k}]")
    if not all_finite(scores):
        raise ValueError("scores must be finite")
    return select("row_topk", _KERNELS, kernel)(scores, k, counts)
