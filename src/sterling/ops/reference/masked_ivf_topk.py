"""Pure-PyTorch masked IVF top-k: the search step of a published index as tensor ops only.

The executor half of a planned search: :meth:`sterling.index.item_index.ItemIndex.plan` (host
side, Python) turns the filters into per-query allowed-row words and first probe counts; this
function returns what :meth:`sterling.index.segment.Segment.search` returns for them, with static
shapes and no data-dependent control flow, so it traces under ``torch.export.export`` (the batch
dimension may be dynamic).

For one query with initial probe count ``p``: the exact top-``kk`` (``kk = min(k, N)``) by
``dot(queries[b], codes[r]) * scales[r]`` (float32, the inner product with the stored vector, as
:func:`sterling.ops.ivf_scan.ivf_scan` scores) among the allowed rows of its ``p`` nearest lists
(by ``queries[b] · centroids[c]``); while fewer than ``kk`` allowed rows lie in those lists and
``p < C``, ``p ← min(C, 4p)`` (the eager search's widening). ``p = 0`` returns nothing; ``p >= C``
probes every list.

Dense over the N rows (correctness over speed: [B, N] scores, never [B, N, D]): the portable
reference beside the index's fused scan.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["masked_ivf_topk"]


def masked_ivf_topk(
    queries: torch.Tensor,
    centroids: torch.Tensor,
    row_list: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    probes: torch.Tensor,
    allowed: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k allowed rows of each query's nearest lists, widened 4× until ``min(k, N)`` are found.

    Args:
        queries (torch.Tensor): float32 [B, D].
        centroids (torch.Tensor): float32 [C, D], C >= 1.
        row_list (torch.Tensor): int64 [N], the list of every row (values in [0, C); in IVF
            order it is nondecreasing, but any order works).
        codes (torch.Tensor): int8 [N, D], the rows' codes.
        scales (torch.Tensor): float32 [N], one scale per row.
        probes (torch.Tensor): int64 [B], the lists each query probes first (0: none, >= C: all).
        allowed (torch.Tensor): int64 [B, W], W = ceil(N / 64): the rows each query may return,
            row r in bit ``r % 64`` of word ``r // 64`` (:func:`sterling.ops.plan_program.pack_rows`).
        k (int): results per query, k >= 1 (beyond N only pads).

    Returns:
        tuple[torch.Tensor, torch.Tensor]: scores float32 [B, k], descending, and rows int64
        [B, k]; past the last result, score -inf and row -1. Equal scores (duplicate rows) are
        ordered as ``torch.topk`` orders them.
    """
    n, c = codes.shape[0], centroids.shape[0]
    kk = min(k, n)
    row = torch.arange(n, device=codes.device)
    bits = (allowed.index_select(1, row // 64) >> (row % 64)) & 1  # int64 [B, N], 1: allowed
    order = torch.argsort(queries @ centroids.T, dim=1, descending=True)  # [B, C], nearest list first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(c, device=order.device).expand_as(order))
    per_list = torch.zeros_like(order).scatter_add_(1, row_list.expand_as(bits), bits)  # [B, C] allowed rows
    within = F.pad(per_list.gather(1, order).cumsum(1), (1, 0))  # [B, C + 1]: allowed rows in the p nearest
    p = probes.clamp(0, c).unsqueeze(1)  # [B, 1]
    for _ in range(((c - 1).bit_length() + 1) // 2):  # ceil(log4 C) steps take any p >= 1 to C
        short = (p > 0) & (p < c) & (within.gather(1, p) < kk)
        p = torch.where(short, (4 * p).clamp(max=c), p)
    keep = (bits != 0) & (rank < p).index_select(1, row_list)  # [B, N]: allowed rows of the p nearest lists
    scores = (queries @ codes.float().T) * scales  # [B, N]
    top = torch.topk(scores.masked_fill(~keep, float("-inf")), kk, dim=1)
    rows = torch.where(torch.isfinite(top.values), top.indices, -1)
    return F.pad(top.values, (0, k - kk), value=float("-inf")), F.pad(rows, (0, k - kk), value=-1)
