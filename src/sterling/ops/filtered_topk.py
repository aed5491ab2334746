"""Filtered top-k dispatcher: validates once, then routes to a kernel."""

from __future__ import annotations

import torch

from sterling.ops.kernel import Kernel, select
from sterling.ops.reference import filtered_topk as reference

_KERNELS = {Kernel.REFERENCE: reference.filtered_topk}


def filtered_topk(
    queries: torch.Tensor,
    items: torch.Tensor,
    mask: torch.Tensor | None,
    k: int,
    block: int = 65536,
    kernel: Kernel = Kernel.REFERENCE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k of ``queries`` over the items passing ``mask``.

    Args:
        queries (torch.Tensor): float [B, D].
        items (torch.Tensor): float [N, D], same dtype as ``queries``.
        mask (torch.Tensor | None): bool [N] (one filter for the batch) or [B, N] (per query);
            None lets every item pass.
        k (int): results per query, k >= 1.
        block (int): items scored at a time; memory is O(B * (block + k)).
        kernel (Kernel): the implementation.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: scores float [B, k], descending, and rows int64 [B, k];
        where fewer than k items pass, the tail holds score -inf and row -1.

    Example::

        scores, rows = filtered_topk(torch.randn(2, 8), torch.randn(100, 8), None, k=5)
    """
    if queries.dim() != 2 or items.dim() != 2 or queries.shape[1] != items.shape[1]:
        raise ValueError(
            f"queries [B, D] and items [N, D] must share D, got {list(queries.shape)} and {list(items.shape)}"
        )
    if not queries.is_floating_point() or queries.dtype != items.dtype:
        raise ValueError(f"queries and items must share a float dtype, got {queries.dtype} and {items.dtype}")
    if mask is not None and (
        mask.dtype != torch.bool or mask.shape not in ((items.shape[0],), (queries.shape[0], items.shape[0]))
    ):
        raise ValueError(
            f"mask must be bool [N] or [B, N] with B={queries.shape[0]}, N={items.shape[0]}, "
            f"got {mask.dtype} {list(mask.shape)}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an int >= 1, got {block!r}")
    return select("filtered_topk", _KERNELS, kernel)(queries, items, mask, k, block)
