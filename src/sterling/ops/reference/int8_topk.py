"""Pure-PyTorch exact top-k over int8 rows: the oracle of :func:`sterling.ops.int8_topk.int8_topk`.

The rows are dequantized (``codes[r] * scales[r]``) and scored in float32 against the float query
by :func:`sterling.ops.reference.filtered_topk.filtered_topk`.
"""

from __future__ import annotations

import torch

from sterling.ops.reference.filtered_topk import filtered_topk


def int8_topk(
    queries: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    rows: torch.Tensor | None,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`sterling.ops.int8_topk.int8_topk` (inputs assumed valid)."""
    if rows is not None:
        codes, scales = codes[rows], scales[rows]
    scores, local = filtered_topk(queries, codes.float() * scales.unsqueeze(1), None, k)
    found = local if rows is None or not len(rows) else rows[local.clamp(min=0)]
    return scores, torch.where(local >= 0, found, -1)
