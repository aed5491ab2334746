"""IVF probe on the CPU (numba): each query's inner products with the centroids (a vectorised
float32 dot per centroid), as (score, list) keys (:func:`sterling.ops.cpu.keys.key`), a cut from a
sample of the keys, a branch-free quickselect of the p largest of those above it, and the largest
moved first (or, without per-row counts, the p sorted:
:func:`sterling.ops.cpu.keys.sort_descending`); queries split across the calling thread and the
shared helpers (:mod:`sterling.ops.cpu.threads`). No torch op runs (see
:mod:`sterling.ops.nearest_lists`)."""

from __future__ import annotations

import numba
import numpy as np
import torch

from sterling.ops.cpu.keys import key, key_row, select_largest, sort_descending
from sterling.ops.cpu.threads import run_chunked

_MIN_QUERIES_PER_THREAD = 16
_SAMPLE_STEP = 8  # every 8th list's key is sampled for the cut


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _dot(queries, b, centroids, c):
    """float32 ``queries[b] · centroids[c]``: LLVM may reorder the sum (to vectorise it) and fuse
    multiply-adds, but not assume finite values (full ``fastmath`` would fold away the check that
    the score is finite)."""
    acc = np.float32(0)
    for d in range(queries.shape[1]):
        acc += queries[b, d] * centroids[c, d]
    return acc


@numba.njit(nogil=True, cache=True)
def _scores(queries, b, centroids, out):
    """``out[c]`` = ``queries[b] · centroids[c]`` for every list c; whether all are finite."""
    finite = True
    for c in range(centroids.shape[0]):
        out[c] = _dot(queries, b, centroids, c)
        finite &= np.isfinite(out[c])
    return finite


@numba.njit(nogil=True, cache=True)
def _keep_largest(scores, keys, p):
    """Writes the keys of ``scores`` [C] into ``keys`` so that ``keys[:p]`` holds the p largest, in
    no order. A cut, the m-th largest of every ``_SAMPLE_STEP``-th key (m chosen so that about 1.25
    p keys clear it), keeps the quickselect to the keys above it; when fewer than p clear it, all
    C are selected from."""
    c = len(scores)
    got = 0
    m = (5 * p + 4 * _SAMPLE_STEP - 1) // (4 * _SAMPLE_STEP) + 6
    if m * _SAMPLE_STEP < c:
        sampled = 0
        for j in range(0, c, _SAMPLE_STEP):
            keys[sampled] = key(scores[j], j)
            sampled += 1
        select_largest(keys, sampled, m)
        cut = keys[0]
        for i in range(1, m):
            cut = min(cut, keys[i])
        for j in range(c):  # branch-free: every key is written, a kept one advances the end
            v = key(scores[j], j)
            keys[got] = v
            got += v >= cut
    if got < p:
        for j in range(c):
            keys[j] = key(scores[j], j)
        got = c
    select_largest(keys, got, p)


@numba.njit(nogil=True, cache=True)
def _nearest(queries, centroids, counts, out, finite, lo, hi):
    """Queries ``lo:hi``: their ``p = out.shape[1]`` nearest lists into ``out``, in order; with
    ``counts`` (int64 [B], else empty) query b's ``counts[b]`` nearest, the nearest first and the
    others in no order, then -1. ``finite[0]`` is cleared where a score is not finite."""
    c = centroids.shape[0]
    p = out.shape[1]
    scores = np.empty(c, np.float32)
    keys = np.empty(c, np.uint64)
    ordered = np.empty(p, np.uint64)
    for b in range(lo, hi):
        if not _scores(queries, b, centroids, scores):
            finite[0] = False
            return
        _keep_largest(scores, keys, p)
        if len(counts) == 0:
            sort_descending(keys, p, ordered)
            for i in range(p):
                out[b, i] = key_row(ordered[i])
            continue
        n = counts[b]
        select_largest(keys, p, n)
        top = 0
        for i in range(1, n):
            top = i if keys[i] > keys[top] else top
        keys[0], keys[top] = keys[top], keys[0]
        for i in range(n):
            out[b, i] = key_row(keys[i])
        for i in range(n, p):
            out[b, i] = -1


def nearest_lists(
    queries: torch.Tensor, centroids: torch.Tensor, p: int, counts: torch.Tensor | None = None
) -> tuple[torch.Tensor, bool]:
    """See :func:`sterling.ops.nearest_lists.nearest_lists` (inputs assumed valid, p >= 1, B >= 1);
    also returns whether every score was finite (the lists are undefined where not)."""
    b = queries.shape[0]
    out = np.empty((b, p), dtype=np.int64)
    finite = np.ones(1, dtype=np.bool_)
    per_row = np.zeros(0, dtype=np.int64) if counts is None else counts.contiguous().numpy()
    args = (queries.contiguous().numpy(), centroids.contiguous().numpy(), per_row, out, finite)
    run_chunked(_nearest, args, b, _MIN_QUERIES_PER_THREAD)
    return torch.from_numpy(out), bool(finite[0])
