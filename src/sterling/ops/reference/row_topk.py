"""Pure-PyTorch top-k columns of each row: the oracle of :func:`sterling.ops.row_topk.row_topk`."""

from __future__ import annotations

import torch


def row_topk(scores: torch.Tensor, k: int, ordered: bool = True) -> torch.Tensor:
    """See :func:`sterling.ops.row_topk.row_topk` (inputs assumed valid): a stable sort keeps the
    lower column first among equal scores (in order whether ``ordered`` or not)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
