"""Top-k columns of each row on the CPU (numba): each row's scores as (score, column) keys
(:func:`sterling.ops.cpu.keys.key`), a branch-free quickselect of the k largest, a sort of those k
(or, with per-row counts, a second quickselect and only the largest moved first); rows split
across the calling thread and the shared helpers (:mod:`sterling.ops.cpu.threads`)."""

from __future__ import annotations

import numba
import numpy as np
import torch

from sterling.ops.cpu.keys import key, key_row, select_largest
from sterling.ops.cpu.threads import run_chunked

_MIN_ROWS_PER_THREAD = 16


@numba.njit(nogil=True, cache=True)
def _row_topk(scores, counts, out, lo, hi):
    """Rows ``lo:hi`` of ``scores`` (float32 [B, C]): their k = ``out.shape[1]`` best columns into
    ``out``, in order; with ``counts`` (int64 [B], else empty) row b's ``counts[b]`` best, the best
    first and the others in no order, then -1."""
    c = scores.shape[1]
    k = out.shape[1]
    keys = np.empty(c, np.uint64)
    for b in range(lo, hi):
        for j in range(c):
            keys[j] = key(scores[b, j], j)
        select_largest(keys, c, k)
        if len(counts) == 0:
            keys[:k] = np.sort(keys[:k])[::-1]
            n = k
        else:
            n = counts[b]
            select_largest(keys, k, n)
            top = 0
            for i in range(1, n):
                top = i if keys[i] > keys[top] else top
            keys[0], keys[top] = keys[top], keys[0]
        for i in range(n):
            out[b, i] = key_row(keys[i])
        for i in range(n, k):
            out[b, i] = -1


def row_topk(scores: torch.Tensor, k: int, counts: torch.Tensor | None = None) -> torch.Tensor:
    """See :func:`sterling.ops.row_topk.row_topk` (inputs assumed valid)."""
    out = np.empty((scores.shape[0], k), dtype=np.int64)
    per_row = np.zeros(0, dtype=np.int64) if counts is None else counts.contiguous().numpy()
    if k and scores.shape[0]:
        run_chunked(_row_topk, (scores.contiguous().numpy(), per_row, out), scores.shape[0], _MIN_ROWS_PER_THREAD)
    return torch.from_numpy(out)
