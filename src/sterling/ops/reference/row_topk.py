"""Pure-PyTorch top-k columns of each row: the oracle of :func:`sterling.ops.row_topk.row_topk`."""

from __future__ import annotations

import torch


def row_topk(scores: torch.Tensor, k: int, counts: torch.Tensor | None = None) -> torch.Tensor:
    """See :func:`sterling.ops.row_topk.row_topk` (inputs assumed valid): a stable sort keeps the
    lower column first among equal scores; with ``counts`` each row's prefix, in order, then -1."""
    top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    if counts is not None:
        top = top.masked_fill(torch.arange(k) >= counts[:, None], -1)
    return top
