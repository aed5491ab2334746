"""Batched CPU int8 IVF scan: queries grouped by probed cluster, one int8 GEMM per cluster.

Why not the reference: its padded gather copies B · P · L code rows and runs int32 element-wise
products (~16 QPS at 1M × 64, nprobe 32, batch 256). Here each probed cluster's codes are read
**once per batch**, against all the queries that probe it:

1. **Group.** The (query, probe) pairs are sorted by cluster; each cluster's slice of query codes
   is contiguous, so a cluster costs one ``torch._int_mm`` [m, D] × [D, L] (int8 × int8 → int32,
   oneDNN VNNI, no shape constraints on CPU except a wrong result at D = 1, handled), one scale
   multiply, the mask, and one top-K of the [m, L] block (K = k, or rescore_k).
2. **Merge.** Block top-Ks land in a dense [pairs, K] buffer (-inf padded), put back in
   (query, probe) order, and one top-K over [B, P · K] per query gives the global top-K. No
   [B, N] or [B, P · L] score matrix is materialised.

Measured (1M × 64, nlist 1024, nprobe 64, batch 256, 1 thread): the top-K of the blocks is ~60%
of the time, the int8 GEMM ~7% (float32 GEMM on dequantized blocks: 2.5-5x slower than
``_int_mm`` at these shapes). A threshold variant (bound each query's K-th score by its nearest
cluster, keep only rows above it) was 10x slower on clustered data: the nearest cluster's K-th
score is a weak bound there (43% of probed rows survived). Scores are computed exactly as the
reference computes them (see :mod:`sterling.ops.reference.int8_scan`), so they agree bit for bit.

Clusters are scanned on ``threads`` Python threads (torch releases the GIL inside ops) while the
intra-op thread count is 1: a [16, 1000] int8 GEMM on 2 OpenMP threads ran ~15x slower than on
one when the cores are shared.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from sterling.ops.reference.int8_scan import rescore_topk

_NEG_INF = float("-inf")
_POOL: ThreadPoolExecutor | None = None


def _pool(threads: int) -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL._max_workers != threads:  # noqa: SLF001
        _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sterling-int8-scan")
    return _POOL


class _Problem:
    """Everything one batch's cluster blocks read, prepared once."""

    def __init__(self, query_codes, codes, scales, list_offsets, probes, mask) -> None:
        n = codes.shape[0]
        self.codes = codes
        self.per_item = scales.shape[0] == n  # else one global scale [1]
        self.scales = scales
        self.offsets = list_offsets.tolist()
        self.mask = mask
        self.blocked = ~mask if mask is not None and mask.dim() == 1 else None
        self.query_codes = query_codes

    def block(
        self, c: int, a: torch.Tensor, qb: torch.Tensor, qp: torch.Tensor
    ) -> tuple[int, torch.Tensor]:
        """float32 [m, L] item-scaled scores of cluster ``c`` for query codes ``a`` [m, D] (the
        queries ``qb`` at probe slots ``qp``), -inf where the mask blocks a row."""
        lo, hi = self.offsets[c], self.offsets[c + 1]
        if self.codes.shape[1] > 1:
            s = torch._int_mm(a, self.codes[lo:hi].T)  # [m, L] int32
        else:  # torch 2.13's CPU _int_mm is wrong at D = 1 ([1, L] view strides): outer product
            s = a.int() * self.codes[lo:hi, 0].int()
        s = s * self.scales[lo:hi] if self.per_item else s.float()
        mask = self.mask
        if mask is not None:
            if mask.dim() == 1:
                s.masked_fill_(self.blocked[lo:hi], _NEG_INF)
            elif mask.dim() == 2:
                s.masked_fill_(mask[qb, lo:hi].logical_not_(), _NEG_INF)
            else:
                s.masked_fill_(mask[qb, qp, : hi - lo].logical_not_(), _NEG_INF)
        return lo, s


def _groups(clusters: torch.Tensor) -> list[tuple[int, int, int]]:
    """(cluster, start, stop) of each run in a sorted cluster vector."""
    values, counts = torch.unique_consecutive(clusters, return_counts=True)
    stops = counts.cumsum(0).tolist()
    starts = [0] + stops[:-1]
    return list(zip(values.tolist(), starts, stops))


def _scan_part(pr: _Problem, groups, a_all, qb, qp, buf_s, buf_r) -> None:
    """Top-kk of every (query, cluster) block of ``groups`` into the pair-sorted buffers."""
    kk = buf_s.shape[1]
    for c, start, stop in groups:
        if pr.offsets[c + 1] == pr.offsets[c]:
            continue
        lo, s = pr.block(c, a_all[start:stop], qb[start:stop], qp[start:stop])
        width = min(kk, s.shape[1])
        if width == 0:
            continue
        if width == s.shape[1]:  # a cluster no longer than kk: keep every row
            top, idx = s, torch.arange(width).expand_as(s)
        else:
            top, idx = s.topk(width, dim=1, sorted=False)
        buf_s[start:stop, :width] = top
        buf_r[start:stop, :width] = idx + lo


class _SingleThreadedOps:
    """Runs torch ops on one intra-op thread: a [16, 1000] int8 GEMM on 2 OpenMP threads is ~15x
    slower than on one when the cores are shared (barrier spin), and parallelism here comes from
    scanning clusters on several Python threads instead. Process-wide while active."""

    def __enter__(self) -> None:
        self.prev = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.prev)


def int8_scan(
    query_codes: torch.Tensor,
    query_scales: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    list_offsets: torch.Tensor,
    probes: torch.Tensor,
    k: int,
    mask: torch.Tensor | None = None,
    rescore: tuple[torch.Tensor, torch.Tensor] | None = None,
    rescore_k: int | None = None,
    threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract and results as :func:`sterling.ops.reference.int8_scan.int8_scan` (ties
    aside); ``threads`` defaults to ``min(2, os.cpu_count())``."""
    b, p = probes.shape
    n = codes.shape[0]
    kk = k if rescore is None else max(k, rescore_k or k)
    pr = _Problem(query_codes, codes, scales, list_offsets, probes, mask)
    qc = probes.flatten()
    pairs = (qc >= 0).nonzero().squeeze(1)  # pair j = (query j // P, slot j % P)
    pairs = pairs[torch.argsort(qc[pairs], stable=True)]  # grouped by cluster
    qb, qp, qc = pairs // p, pairs % p, qc[pairs]
    a_all = query_codes[qb]  # [pairs, D]: each cluster's queries are one contiguous slice
    buf_s = torch.full((len(pairs), kk), _NEG_INF)
    buf_r = torch.full((len(pairs), kk), -1, dtype=torch.int64)
    groups = _groups(qc) if len(qc) else []
    threads = min(2, os.cpu_count() or 1) if threads is None else threads
    with _SingleThreadedOps():
        if threads > 1 and len(groups) > 1:
            work = lambda g: (g[2] - g[1]) * (pr.offsets[g[0] + 1] - pr.offsets[g[0]])  # noqa: E731
            by_size = sorted(groups, key=work, reverse=True)
            parts = [by_size[i::threads] for i in range(threads)]
            futures = [
                _pool(threads).submit(_scan_part, pr, part, a_all, qb, qp, buf_s, buf_r)
                for part in parts
            ]
            for f in futures:
                f.result()
        else:
            _scan_part(pr, groups, a_all, qb, qp, buf_s, buf_r)
    # back to (query, slot) order; absent pairs (probe -1) stay -inf
    all_s = torch.full((b * p, kk), _NEG_INF)
    all_r = torch.full((b * p, kk), -1, dtype=torch.int64)
    all_s[pairs] = buf_s
    all_r[pairs] = buf_r
    all_s, all_r = all_s.view(b, p * kk), all_r.view(b, p * kk)
    if all_s.shape[1] < kk:
        pad = kk - all_s.shape[1]
        all_s = torch.cat([all_s, torch.full((b, pad), _NEG_INF)], 1)
        all_r = torch.cat([all_r, torch.full((b, pad), -1, dtype=torch.int64)], 1)
    scores, pick = all_s.topk(kk, dim=1)
    rows = all_r.gather(1, pick).masked_fill_(torch.isneginf(scores), -1)
    if not pr.per_item:
        scores = scores * scales  # global scale: applied once, same float ops as the reference
    scores = scores * query_scales[:, None]
    if rescore is not None:
        return rescore_topk(rows, rescore[0], rescore[1], k)
    return scores, rows
