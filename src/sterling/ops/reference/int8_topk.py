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
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`sterling.ops.int8_topk.int8_topk` (every row scored; inputs assumed valid)."""
    return filtered_topk(queries, codes.float() * scales.unsqueeze(1), None, k)
