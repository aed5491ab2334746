"""Fused CPU filtered int8 IVF scan (numba): Bloom words → surviving rows → int8 dot → running top-k.

What is fused (silvertorch.md §3.3, §4): for each (query, probed cluster) the kernel walks the
cluster's Bloom words (64 rows each), runs the query's plan program on them (a few 64-bit ANDs /
ORs), ANDs the live-row word and the cluster's edges, and only for the set bits computes the dot
product of the int8 codes with the float query (see ``_dot``; vectorised by LLVM) and offers the score to the query's top-k heap.
Nothing of size [B, N] or [B, P, L] is ever materialised, and filtered rows cost one bit test.

Loop order: **cluster-major within a chunk of queries.** The (query, probe) pairs of a chunk are
bucketed by cluster (a counting sort), and each cluster is scanned for all the chunk's queries that
probe it in turn, so its codes and Bloom words stay in cache across those queries instead of being
re-read from memory once per query. Each query keeps its own buffer across clusters.

Threads: the batch is cut into one chunk per thread and the compiled function runs with the GIL
released (``nogil``) on a small thread pool, so concurrent callers and torch's own threads compose
(no numba threading layer is involved). Compiled once per machine and cached (``cache=True``).

Scores are ``dot(codes[r], queries[b]) * scales[r]`` in float32, the reference's definition up to
the order of the float32 sum.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from sterling.ops.cpu.bits import cttz
from sterling.ops.cpu.threads import run_chunked
from sterling.ops.plan_program import PlanProgram

_MIN_QUERIES_PER_THREAD = 4


@numba.njit(nogil=True, cache=True, inline="always")
def _plan_word(bits, ops, prow, t0, t1, w, stack):
    """The plan ``ops[t0:t1]`` evaluated on word column ``w`` of ``bits`` (uint64 [R, W])."""
    ones = np.uint64(0xFFFFFFFFFFFFFFFF)
    zero = np.uint64(0)
    sp = 0
    for t in range(t0, t1):
        code = ops[t, 0]
        a = ops[t, 1]
        b = ops[t, 2]
        if code == 0:
            v = ones
        elif code == 1:
            v = zero
        elif code == 2:
            v = ones
            for i in range(a, b):
                v &= bits[prow[i], w]
        elif code == 3 or code == 4:
            v = zero
            for i in range(a, b):
                v |= bits[prow[i], w]
            if code == 4:
                v = ~v
        else:
            v = stack[sp - 1]
            for i in range(2, a + 1):
                if code == 5:
                    v &= stack[sp - i]
                else:
                    v |= stack[sp - i]
            sp -= a
        stack[sp] = v
        sp += 1
    return stack[0]


@numba.njit(nogil=True, cache=True, fastmath=True)
def _dot(codes, r, q):
    """float32 dot of int8 row ``codes[r]`` and the float32 query ``q``: the codes are widened
    in registers (vpmovsxbd + vcvtdq2ps + FMA on AVX-512), as fast as an int8 dot here, and the
    query needs no quantization. ``fastmath`` lets LLVM reorder the sum to vectorise it (numba
    would widen int8 products to int64 otherwise)."""
    acc = np.float32(0)
    for i in range(q.shape[0]):
        acc += np.float32(codes[r, i]) * q[i]
    return acc


@numba.njit(nogil=True, cache=True)
def _select(vs, vr, n, k):
    """Quickselect: reorders ``vs[:n]`` (and ``vr`` alongside) so that ``vs[:k]`` holds the k
    largest scores (in no order)."""
    lo = 0
    hi = n - 1
    while lo < hi:
        mid = (lo + hi) >> 1
        a, b, c = vs[lo], vs[mid], vs[hi]
        pivot = max(min(a, b), min(max(a, b), c))  # median of three
        i = lo
        j = hi
        while i <= j:
            while vs[i] > pivot:
                i += 1
            while vs[j] < pivot:
                j -= 1
            if i <= j:
                vs[i], vs[j] = vs[j], vs[i]
                vr[i], vr[j] = vr[j], vr[i]
                i += 1
                j -= 1
        if k - 1 <= j:
            hi = j
        elif k - 1 >= i:
            lo = i
        else:
            return


@numba.njit(nogil=True, cache=True)
def _scan_chunk(
    queries,
    codes,
    scales,
    offsets,
    probes,
    bits,
    ops,
    prow,
    pstart,
    plan_of,
    alive,
    has_alive,
    depth,
    buf_s,
    buf_r,
    out_s,
    out_r,
    b0,
    b1,
):
    """Scans queries ``b0:b1``; writes their top-k (descending) into ``out_s`` / ``out_r``.

    Each query collects scores above its running threshold in a buffer (``buf_s`` / ``buf_r``,
    [B, 2k]); a full buffer is cut back to its k best by quickselect, whose k-th score becomes
    the new threshold. Amortised O(1) per candidate, where a k-heap pays O(log k) per insert."""
    ones = np.uint64(0xFFFFFFFFFFFFFFFF)
    nlist = offsets.shape[0] - 1
    k = out_s.shape[1]
    cap = buf_s.shape[1]
    p = probes.shape[1]
    stack = np.empty(max(depth, 1), np.uint64)
    sizes = np.zeros(b1 - b0, np.int64)
    floor = np.full(b1 - b0, -np.inf, np.float32)
    # bucket the chunk's (query, probe) pairs by cluster
    heads = np.zeros(nlist + 1, np.int64)
    for b in range(b0, b1):
        for j in range(p):
            c = probes[b, j]
            if c >= 0:
                heads[c + 1] += 1
    for c in range(nlist):
        heads[c + 1] += heads[c]
    fill = heads[:-1].copy()
    members = np.empty(heads[nlist], np.int64)
    for b in range(b0, b1):
        for j in range(p):
            c = probes[b, j]
            if c >= 0:
                members[fill[c]] = b
                fill[c] += 1
    for c in range(nlist):
        s = offsets[c]
        e = offsets[c + 1]
        if s >= e:
            continue
        for m in range(heads[c], heads[c + 1]):
            b = members[m]
            vs = buf_s[b]
            vr = buf_r[b]
            size = sizes[b - b0]
            threshold = floor[b - b0]
            g = plan_of[b]
            q = queries[b]
            for w in range(s >> 6, ((e - 1) >> 6) + 1):
                word = ones
                if g >= 0:
                    word = _plan_word(bits, ops, prow, pstart[g], pstart[g + 1], w, stack)
                if has_alive:
                    word &= alive[w]
                base = w << 6
                if base < s:
                    word &= ones << np.uint64(s - base)
                if base + 64 > e:
                    word &= (np.uint64(1) << np.uint64(e - base)) - np.uint64(1)
                while word != 0:
                    r = base + np.int64(cttz(word))
                    word &= word - np.uint64(1)
                    score = _dot(codes, r, q) * scales[r]
                    if score > threshold:
                        vs[size] = score
                        vr[size] = r
                        size += 1
                        if size == cap:
                            _select(vs, vr, size, k)
                            size = k
                            threshold = vs[0]
                            for i in range(1, k):
                                threshold = min(threshold, vs[i])
            sizes[b - b0] = size
            floor[b - b0] = threshold
    # the k best of each buffer, descending; an unfilled tail stays -inf / -1
    for b in range(b0, b1):
        size = sizes[b - b0]
        if size > k:
            _select(buf_s[b], buf_r[b], size, k)
            size = k
        order = np.argsort(-buf_s[b, :size])
        for i in range(size):
            out_s[b, i] = buf_s[b, order[i]]
            out_r[b, i] = buf_r[b, order[i]]


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
    out_s = np.full((b, k), -np.inf, dtype=np.float32)
    out_r = np.full((b, k), -1, dtype=np.int64)
    buf_s = np.empty((b, 2 * k), dtype=np.float32)
    buf_r = np.empty((b, 2 * k), dtype=np.int64)
    words = bits.contiguous().numpy().view(np.uint64)
    live = (alive if alive is not None else torch.zeros(1, dtype=torch.int64)).contiguous().numpy().view(np.uint64)
    args = (
        queries.contiguous().numpy(),
        codes.contiguous().numpy(),
        scales.contiguous().numpy(),
        list_offsets.contiguous().numpy(),
        probes.contiguous().numpy(),
        words,
        program.ops.contiguous().numpy(),
        program.rows.contiguous().numpy(),
        program.starts.contiguous().numpy(),
        plan_of.contiguous().numpy(),
        live,
        alive is not None,
        program.depth,
        buf_s,
        buf_r,
        out_s,
        out_r,
    )
    run_chunked(_scan_chunk, args, b, _MIN_QUERIES_PER_THREAD)
    return torch.from_numpy(out_s), torch.from_numpy(out_r)
