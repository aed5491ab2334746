"""Top-k columns of each row on the CPU (numba): each row's scores as (score, column) keys
(:func:`sterling.ops.cpu.keys.key`), a branch-free quickselect of the k largest, a sort of those k;
rows split across the shared thread pool. About 2x ``torch.topk`` for the probe of a search (256
queries × 1,024 lists)."""

from __future__ import annotations

import numba
import numpy as np
import torch

from sterling.ops.cpu.keys import key, key_row, select_largest
from sterling.ops.cpu.threads import run_chunked

_MIN_ROWS_PER_THREAD = 16


@numba.njit(nogil=True, cache=True)
def _row_topk(scores, out, lo, hi):
    """Rows ``lo:hi`` of ``scores`` (float32 [B, C]): their k = ``out.shape[1]`` best columns into
    ``out``, best first."""
    c = scores.shape[1]
    k = out.shape[1]
    keys = np.empty(c, np.uint64)
    for b in range(lo, hi):
        for j in range(c):
            keys[j] = key(scores[b, j], j)
        select_largest(keys, c, k)
        best = np.sort(keys[:k])
        for i in range(k):
            out[b, i] = key_row(best[k - 1 - i])


def row_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """See :func:`sterling.ops.row_topk.row_topk` (inputs assumed valid)."""
    out = np.empty((scores.shape[0], k), dtype=np.int64)
    if k and scores.shape[0]:
        run_chunked(_row_topk, (scores.contiguous().numpy(), out), scores.shape[0], _MIN_ROWS_PER_THREAD)
    return torch.from_numpy(out)
