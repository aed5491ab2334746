"""Pure-PyTorch filtered int8 IVF scan: the oracle every fast path of
:func:`sterling.ops.ivf_scan.ivf_scan` is tested against.

One query at a time, the plainest way: gather the rows of the probed clusters, read each row's
Bloom bits, run the query's plan program on bool tensors (one element per row), AND the live rows,
score the survivors and take one top-k. The score of sorted row ``r`` for query ``b`` is
``dot(codes[r], queries[b]) * scales[r]`` in float32: the inner product of the query with the
stored (dequantized) vector. Kernels may sum in another order, so scores agree to float32 rounding.
"""

from __future__ import annotations

import torch

from sterling.ops.plan_program import PlanProgram, bit_of, plan_mask


def ivf_scan(
    queries: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    list_offsets: torch.Tensor,
    probes: torch.Tensor,
    k: int,
    bits: torch.Tensor,
    program: PlanProgram,
    plan_of: torch.Tensor,
    alive: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`sterling.ops.ivf_scan.ivf_scan` (inputs assumed valid)."""
    b = queries.shape[0]
    out_scores = torch.full((b, k), float("-inf"))
    out_rows = torch.full((b, k), -1, dtype=torch.int64)
    for i in range(b):
        clusters = probes[i][probes[i] >= 0].tolist()
        spans = [torch.arange(int(list_offsets[c]), int(list_offsets[c + 1])) for c in clusters]
        rows = torch.cat(spans) if spans else torch.zeros(0, dtype=torch.int64)
        keep = torch.ones(rows.shape, dtype=torch.bool)
        if int(plan_of[i]) >= 0:
            keep &= plan_mask(bits, program, int(plan_of[i]), rows)
        if alive is not None:
            keep &= bit_of(alive, rows)
        rows = rows[keep]
        s = (codes[rows].float() @ queries[i]) * scales[rows]
        top = torch.topk(s, min(k, len(rows)))
        out_scores[i, : len(top.values)] = top.values
        out_rows[i, : len(top.values)] = rows[top.indices]
    return out_scores, out_rows
