"""Pure-PyTorch IVF probe: the oracle of :func:`sterling.ops.nearest_lists.nearest_lists`."""

from __future__ import annotations

import torch


def nearest_lists(
    queries: torch.Tensor, centroids: torch.Tensor, p: int, counts: torch.Tensor | None = None
) -> tuple[torch.Tensor, bool]:
    """See :func:`sterling.ops.nearest_lists.nearest_lists` (inputs assumed valid, p >= 1): the scores as one
    matrix product, a stable sort (the lower list first among equal scores); with ``counts`` each
    row's prefix, in order, then -1. Also returns whether every score is finite."""
    scores = queries @ centroids.T  # [B, C]
    top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :p]  # [B, p]
    if counts is not None:
        top = top.masked_fill(torch.arange(p) >= counts[:, None], -1)
    return top, bool(torch.isfinite(scores).all())
