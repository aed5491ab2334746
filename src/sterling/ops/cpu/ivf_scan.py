"""List-major CPU filtered int8 IVF scan (numba): Bloom words → 16-row int8 blocks → cut → exact top-k.

What is fused (silvertorch.md §3.3, §4): for each (query, probed list) the query's plan program runs
on the list's Bloom words only (a few 64-bit ANDs / ORs per 64 rows), ANDed with the live rows;
filtered rows cost one bit. Nothing of size [B, N] or [B, P, L] is ever materialised.

**Loop order: list-major over the whole batch.** The (query, probed list) pairs are grouped by list
(a counting sort, :func:`_bucket`) and each list is read once per batch for all the queries that
probe it (its *members*, those of one plan side by side: a plan's passing rows are found once for
all its members); lists run in row order, so the rows 64 ahead are prefetched while a block is
scored. When the members' passing rows outnumber the list's 16-row blocks, the list is scored
block by block: a block's 16 rows against every member with a passing row in it, ``D / 4`` int8
dot-product instructions per member (:func:`sterling.ops.cpu.vnni.tile_dots`, ``vpdpbusd`` on
AVX-512 VNNI, the rows held in registers), each query quantized to int8. Only rows whose int8
score clears the query's **cut** are scored exactly (float32 query · int8 codes × scale, ``_dot``)
and offered to its running top-k: the cut is the running k-th exact score, divided by the query's
step, less the list's rounding bound (:func:`list_bounds`), so no row that could enter the top-k is
skipped (the bound argument of :mod:`sterling.ops.cpu.int8_topk`). A list whose members pass fewer
rows than it has blocks is scored row by row. The batch runs in two rounds, each query's nearest
list first, so the cut of the rest starts from the k-th score of that list. While a list runs, the
Bloom runs the next list's members will read are prefetched (a Bloom row is a long array: the runs
of one list are far apart in memory).

Threads: the lists of a round are cut into contiguous runs of about equal work, 8 per thread, which
the threads claim one at a time (an atomic counter) until none is left, so a thread that starts
late or meets slower lists takes fewer. Each thread keeps its own running top-k per query, the
largest k-th score of any thread (a lower bound of the final one) starts every thread's next round
and is read by the others as they run, and the buffers are merged at the end. The compiled
functions run with the GIL released (``nogil``) on the calling thread and the shared helpers
(:mod:`sterling.ops.cpu.threads`), so concurrent callers and torch's own threads compose (no numba
threading layer is involved). Compiled once per machine and cached (``cache=True``).

Scores are ``dot(codes[r], queries[b]) * scales[r]`` in float32, the reference's definition up to
the order of the float32 sum.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from sterling.ops.cpu.atomics import fetch_add
from sterling.ops.cpu.bits import cttz, popcount
from sterling.ops.cpu.keys import compact, key, key_row, key_score, select_largest, sort_descending
from sterling.ops.cpu.threads import finish_parts, run_chunked, run_parts, start_parts
from sterling.ops.cpu.vnni import prefetch, tile_dots, tile_masks
from sterling.ops.plan_program import ALL, AND, ANY, FALSE, NONE, TRUE, PlanProgram
from sterling.ops.quantize import quantize_finite_rows

_MIN_QUERIES_PER_THREAD = 4
_FEW_QUERIES = 4  # batches whose nearest lists the calling thread scans alone while the helpers wake
_RUNS_PER_THREAD = 8  # runs of lists a round is cut into, per thread: threads claim them as they go
_AHEAD = 64  # rows prefetched ahead of the block being scored
_SLACK = np.float32(1.0 + 2.0**-8)  # float32 rounding, on top of the query-rounding bound


@numba.njit(nogil=True, cache=True)
def _plan_words(bits, ops, prow, t0, t1, w0, nw, words, m, stack):
    """``words[m, j]`` for ``j < nw``: the plan ``ops[t0:t1]`` evaluated on word column ``w0 + j``
    of ``bits`` (uint64 [R, W]), word by word. One call per member, the words inside (numba counts
    the references of every array a function receives: see :func:`_member_words`)."""
    ones = np.uint64(0xFFFFFFFFFFFFFFFF)
    zero = np.uint64(0)
    for j in range(nw):
        w = w0 + j
        sp = 0
        for t in range(t0, t1):
            code = ops[t, 0]
            a = ops[t, 1]
            b = ops[t, 2]
            if code == TRUE:
                v = ones
            elif code == FALSE:
                v = zero
            elif code == ALL:
                v = ones
                for i in range(a, b):
                    v &= bits[prow[i], w]
            elif code == ANY or code == NONE:
                v = zero
                for i in range(a, b):
                    v |= bits[prow[i], w]
                if code == NONE:
                    v = ~v
            else:
                v = stack[sp - 1]
                for i in range(2, a + 1):
                    if code == AND:
                        v &= stack[sp - i]
                    else:
                        v |= stack[sp - i]
                sp -= a
            stack[sp] = v
            sp += 1
        words[m, j] = stack[0]


@numba.njit(nogil=True, cache=True, fastmath=True)
def _dot(codes, r, queries, b):
    """float32 dot of int8 row ``codes[r]`` and the float32 query ``queries[b]``: the codes are widened
    in registers (vpmovsxbd + vcvtdq2ps + FMA on AVX-512), as fast as an int8 dot here, and the
    query needs no quantization. ``fastmath`` lets LLVM reorder the sum to vectorise it (numba
    would widen int8 products to int64 otherwise)."""
    acc = np.float32(0)
    for i in range(queries.shape[1]):
        acc += np.float32(codes[r, i]) * queries[b, i]
    return acc


@numba.njit(nogil=True, cache=True, inline="always")
def _cut(threshold, qscale, eps):
    """The approximate-score cut of a query: a row whose int8 score ``a`` (query codes · row codes ×
    row scale) is below it cannot reach the threshold key's score: its float score is at most
    ``qscale * (a + eps)`` (each query component is rounded by at most half a step)."""
    if threshold == 0:
        return np.float32(-np.inf)
    t = key_score(threshold) / qscale
    return np.float32(t - eps * _SLACK - abs(t) * np.float32(2.0**-20))


@numba.njit(nogil=True, cache=True)
def _member_words(
    bits, ops, prow, pstart, plan_of, alive, has_alive, members, m0, m1, s, e, words, firsts, passing, stack
):
    """Groups the members ``m0:m1`` of the list of rows ``s:e`` by plan (:func:`_bucket` puts the
    members of one plan side by side) and returns the number of groups: group ``j`` is
    ``members[firsts[j]:firsts[j + 1]]``, ``words[j]`` [ceil((e - s) / 64)] the rows that pass its
    plan (``plan_of``; -1: all) and are alive, re-based so that bit 0 of word 0 is row ``s``
    (``words[j]`` holds one word more, scratch), and ``passing[j]`` their count. ``bits``: the
    Bloom words [R, W].

    A plan of one leaf (the AND or OR of a few Bloom rows, what a single-term filter compiles to)
    runs row by row over the list's words (contiguous, vectorised); others run the plan program
    word by word. One call per list, arrays indexed in place: numba counts the references of
    every array a function receives, two atomic operations per array and call."""
    ones = np.uint64(0xFFFFFFFFFFFFFFFF)
    w0 = s >> 6
    nw = ((e - 1) >> 6) + 1 - w0
    n = e - s
    groups = 0
    at = m0
    while at < m1:
        g = plan_of[members[at]]
        firsts[groups] = at
        while at < m1 and plan_of[members[at]] == g:
            at += 1
        m = groups
        groups += 1
        t0 = pstart[g] if g >= 0 else 0
        if g < 0:
            for j in range(nw):
                words[m, j] = ones
        elif pstart[g + 1] - t0 == 1 and ALL <= ops[t0, 0] <= NONE:
            code = ops[t0, 0]
            start = ones if code == ALL else np.uint64(0)
            for j in range(nw):
                words[m, j] = start
            for i in range(ops[t0, 1], ops[t0, 2]):
                row = prow[i]
                if code == ALL:
                    for j in range(nw):
                        words[m, j] &= bits[row, w0 + j]
                else:
                    for j in range(nw):
                        words[m, j] |= bits[row, w0 + j]
            if code == NONE:
                for j in range(nw):
                    words[m, j] = ~words[m, j]
        else:
            _plan_words(bits, ops, prow, t0, pstart[g + 1], w0, nw, words, m, stack)
        if has_alive:
            for j in range(nw):
                words[m, j] &= alive[w0 + j]
        shift = np.uint64(s & 63)
        if shift:
            words[m, nw] = 0
            for j in range(nw):
                words[m, j] = (words[m, j] >> shift) | (words[m, j + 1] << (np.uint64(64) - shift))
        if n & 63:
            words[m, ((n + 63) >> 6) - 1] &= (np.uint64(1) << np.uint64(n & 63)) - np.uint64(1)
        count = 0
        for j in range((n + 63) >> 6):
            count += popcount(words[m, j])
        passing[m] = count
    firsts[groups] = m1
    return groups


@numba.njit(nogil=True, cache=True)
def _scan_lists(
    queries,
    qwords,
    qfix,
    qscale,
    codes,
    codes32,
    scales,
    offsets,
    bounds,
    heads,
    members,
    bits,
    ops,
    prow,
    pstart,
    plan_of,
    alive,
    has_alive,
    depth,
    buf,
    sizes,
    floors,
    t,
    k,
    cuts,
    claims,
):
    """Claims runs of lists (run j is lists ``cuts[j]:cuts[j + 1]``; ``claims[0]``, the next run, is
    shared by the threads) until none is left, and scans each list for every query that probes it
    (``members[heads[c]:heads[c + 1]]``),
    offering the rows that pass each query's plan to its buffer (``buf`` [B, cap] keys of
    :func:`sterling.ops.cpu.keys.key`, ``sizes`` [B], ``floors[t]`` [B] the threshold keys: this
    thread's running top-k of every query). A query's threshold is also raised to the other
    threads' (``floors`` [T, B], read as they run: each is the k-th key of some rows, at or below
    the final k-th).

    A list runs block by block of 16 rows, each block for the members with a passing row in it.
    Where the members' passing rows outnumber the list's blocks, a block's 16 rows are first scored
    against those members at once on the dot-product units (:func:`sterling.ops.cpu.vnni.tile_dots`,
    the rows held in registers), and only the passing rows whose int8 score clears the member's cut
    (:func:`sterling.ops.cpu.vnni.tile_masks`, :func:`_cut` with the list's rounding bound
    ``bounds[c]``) are scored exactly (float query · codes × scale) and offered; in a sparser list
    every passing row is."""
    groups = qwords.shape[1]
    blocked = codes32.shape[1] == groups and groups % 16 == 0
    stack = np.empty(max(depth, 1), np.uint64)
    longest = 0
    most = 0
    for c in range(cuts[0], cuts[-1]):
        longest = max(longest, offsets[c + 1] - offsets[c])
        most = max(most, heads[c + 1] - heads[c])
    words = np.zeros((most, ((longest + 63) >> 6) + 2), np.uint64)  # a list spans up to one word more
    firsts = np.zeros(most + 1, np.int64)  # each plan's first member
    passing = np.zeros(most, np.int64)  # each plan's passing rows
    # the members of one list: query words, offsets, cuts, sums, masks
    mq = np.zeros((most, groups), np.int32)
    mfix = np.zeros(most, np.int64)
    mcut = np.zeros(most, np.float32)
    acc = np.zeros(most * 16, np.int32)
    hits = np.zeros(most, np.int64)
    sel = np.zeros(most, np.int64)
    # each block's members with a passing row in it, and those rows (16 bits): [block, member slot]
    blocks = (longest + 15) >> 4
    picks = np.zeros(blocks, np.int64)
    pick_member = np.zeros((blocks, most), np.int64)
    pick_chunk = np.zeros((blocks, most), np.uint64)
    chunks = np.zeros(most, np.uint64)
    seen = np.full(bits.shape[0], -1, np.int64)  # the next list a Bloom row was prefetched for
    floor = floors[t]
    while True:  # claim the next run of lists until none is left
        run = fetch_add(claims, 0, 1)
        if run >= len(cuts) - 1:
            break
        c1 = cuts[run + 1]
        for c in range(cuts[run], c1):
            s = offsets[c]
            e = offsets[c + 1]
            if s >= e or heads[c] == heads[c + 1]:
                continue
            n = e - s
            count = heads[c + 1] - heads[c]
            # the Bloom runs the next list's members read come in from memory while this list runs
            nxt = c + 1
            while nxt < c1 and heads[nxt] == heads[nxt + 1]:
                nxt += 1
            if nxt < c1:
                w_lo = offsets[nxt] >> 6
                w_hi = ((offsets[nxt + 1] - 1) >> 6) + 1
                for i in range(heads[nxt], heads[nxt + 1]):
                    g = plan_of[members[i]]
                    if g >= 0:
                        for op in range(pstart[g], pstart[g + 1]):
                            if ALL <= ops[op, 0] <= NONE:
                                for at in range(ops[op, 1], ops[op, 2]):
                                    row = prow[at]
                                    if seen[row] != nxt:
                                        seen[row] = nxt
                                        for w in range(w_lo, w_hi, 8):
                                            prefetch(bits, row * bits.shape[1] + w)
                                        prefetch(bits, row * bits.shape[1] + w_hi - 1)
            for i in range(count):
                b = members[heads[c] + i]
                for other in range(floors.shape[0]):
                    floor[b] = max(floor[b], floors[other, b])
            m0 = heads[c]
            m1 = heads[c + 1]
            plans = _member_words(
                bits, ops, prow, pstart, plan_of, alive, has_alive, members, m0, m1, s, e, words, firsts, passing, stack
            )
            rows = 0  # the passing rows of all members
            for j in range(plans):
                rows += passing[j] * (firsts[j + 1] - firsts[j])
            # blocks pay once the passing rows outnumber them (scoring a block for every member costs
            # about one exact row); in a sparser list every passing row is scored exactly
            tiled = blocked and rows * 16 >= n
            if tiled:
                for i in range(count):
                    b = members[heads[c] + i]
                    for j in range(groups):
                        mq[i, j] = qwords[b, j]
                    mfix[i] = qfix[b]
                    mcut[i] = _cut(floor[b], qscale[b], bounds[c])
            picks[: (n + 15) >> 4] = 0
            for j in range(plans):  # only the nonzero 16-bit chunks of each plan's words are visited
                for w in range((n + 63) >> 6):
                    word = words[j, w]
                    while word != 0:
                        at = np.int64(cttz(word)) >> 4
                        blk = 4 * w + at
                        chunk = (word >> np.uint64(16 * at)) & np.uint64(0xFFFF)
                        for i in range(firsts[j] - m0, firsts[j + 1] - m0):  # the plan's members
                            pick_member[blk, picks[blk]] = i
                            pick_chunk[blk, picks[blk]] = chunk
                            picks[blk] += 1
                        while not tiled and chunk != 0:  # the rows scored exactly come in side by side
                            r = s + 16 * blk + np.int64(cttz(chunk))
                            chunk &= chunk - np.uint64(1)
                            prefetch(codes, r * codes.shape[1])
                            prefetch(scales, r)
                        word &= ~(np.uint64(0xFFFF) << np.uint64(16 * at))
            for blk in range((n + 15) >> 4):
                r0 = s + 16 * blk
                valid = min(16, e - r0)
                if tiled:  # the rows _AHEAD on come in from memory while this block is scored
                    ahead = r0 + _AHEAD
                    if ahead >= e and nxt < c1:  # past this list: the next probed list's first rows
                        ahead += offsets[nxt] - e
                    for i in range(0, 16 * groups, 16):
                        prefetch(codes32, ahead * groups + i)
                    prefetch(scales, ahead)
                picked = picks[blk]  # the members with a passing row in the block
                if picked == 0:
                    continue
                for j in range(picked):
                    sel[j] = pick_member[blk, j]
                    chunks[j] = pick_chunk[blk, j]
                if tiled:
                    for tile in range(groups >> 4):
                        at = 16 * tile
                        tile_dots(codes32, r0 * groups + at, groups, valid, mq, at, groups, sel, picked, acc, tile == 0)
                    found = tile_masks(acc, sel, picked, mfix, scales, r0, valid, mcut, chunks, hits)
                else:
                    found = picked
                for x in range(found):  # the members with a row to score exactly: slot j, rows chunk
                    if tiled:
                        j = hits[x] & 0xFFFFFFFF
                        chunk = np.uint64(hits[x]) >> np.uint64(32)
                    else:
                        j = x
                        chunk = chunks[x]
                    i = sel[j]
                    b = members[heads[c] + i]
                    size = sizes[b]
                    threshold = floor[b]
                    while chunk != 0:
                        r = r0 + np.int64(cttz(chunk))
                        chunk &= chunk - np.uint64(1)
                        entry = key(_dot(codes, r, queries, b) * scales[r], r)
                        if entry > threshold:
                            buf[b, size] = entry
                            size += 1
                            if size == buf.shape[1]:
                                size, threshold = k, compact(buf, b, k)
                    if tiled and threshold != floor[b]:
                        mcut[i] = _cut(threshold, qscale[b], bounds[c])
                    sizes[b] = size
                    floor[b] = threshold


@numba.njit(nogil=True, cache=True)
def _merge(buf, sizes, out_s, out_r, lo, hi):
    """Queries ``lo:hi``: the k best keys of every thread's buffer, descending, into ``out_s`` /
    ``out_r`` (an unfilled tail stays -inf / -1)."""
    k = out_s.shape[1]
    threads = buf.shape[0]
    keys = np.empty(threads * buf.shape[2], np.uint64)
    best = np.empty(k, np.uint64)
    for b in range(lo, hi):
        size = 0
        for t in range(threads):
            for i in range(sizes[t, b]):
                keys[size] = buf[t, b, i]
                size += 1
        if size > k:
            select_largest(keys, size, k)
            size = k
        sort_descending(keys, size, best)
        for i in range(size):
            out_s[b, i] = key_score(best[i])
            out_r[b, i] = key_row(best[i])


@numba.njit(nogil=True, cache=True)
def _bucket(probes, offsets, lo, hi, runs, order):
    """The (query, probed list) pairs of probe ranks ``lo:hi`` grouped by list:
    ``members[heads[c]:heads[c + 1]]`` are the queries probing list c in the order of ``order`` (a
    counting sort; queries ordered by plan put each list's members of one plan side by side), and
    ``cuts`` [runs + 1] splits the lists into ``runs`` contiguous runs of about equal work (rows ×
    (members + 1) of each probed list)."""
    nlist = offsets.shape[0] - 1
    heads = np.zeros(nlist + 1, np.int64)
    for b in range(probes.shape[0]):
        for j in range(lo, hi):
            if probes[b, j] >= 0:
                heads[probes[b, j] + 1] += 1
    for c in range(nlist):
        heads[c + 1] += heads[c]
    fill = heads[:-1].copy()
    members = np.empty(heads[nlist], np.int64)
    for b in order:
        for j in range(lo, hi):
            c = probes[b, j]
            if c >= 0:
                members[fill[c]] = b
                fill[c] += 1
    work = np.zeros(nlist + 1, np.int64)
    for c in range(nlist):
        count = heads[c + 1] - heads[c]
        work[c + 1] = work[c] + ((offsets[c + 1] - offsets[c]) * (count + 1) if count else 0)
    cuts = np.full(runs + 1, nlist, np.int64)
    cuts[0] = 0
    c = 0
    for t in range(1, runs):
        while c < nlist and work[c + 1] * runs < work[nlist] * t:
            c += 1
        cuts[t] = c
    return heads, members, cuts


def list_bounds(codes: torch.Tensor, scales: torch.Tensor, list_offsets: torch.Tensor) -> torch.Tensor:
    """float32 [nlist]: the largest ``scales[r] * sum_d |codes[r, d]| / 2`` of each list's rows (0 for
    an empty list), the most a query's int8 rounding moves a row's score, in query steps."""
    rows = codes.abs().sum(1, dtype=torch.int32).float() * scales / 2
    lengths = list_offsets.diff()
    owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    return torch.zeros(len(lengths)).scatter_reduce_(0, owner, rows, "amax")


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
    bounds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`sterling.ops.ivf_scan.ivf_scan` (inputs assumed valid); ``bounds`` is
    :func:`list_bounds` of the codes (computed when None)."""
    b, d = queries.shape
    out_s = np.full((b, k), -np.inf, dtype=np.float32)
    out_r = np.full((b, k), -1, dtype=np.int64)
    if b == 0 or not len(codes):
        return torch.from_numpy(out_s), torch.from_numpy(out_r)
    if bounds is None:
        bounds = list_bounds(codes, scales, list_offsets)
    offsets = list_offsets.contiguous().numpy()
    probes_np = probes.contiguous().numpy()
    q = queries.contiguous().numpy()
    codes_np = codes.contiguous().numpy()
    scales_np = scales.contiguous().numpy()
    live = (alive if alive is not None else torch.zeros(1, dtype=torch.int64)).contiguous().numpy().view(np.uint64)
    plan = (
        bits.contiguous().numpy().view(np.uint64),
        program.ops.contiguous().numpy(),
        program.rows.contiguous().numpy(),
        program.starts.contiguous().numpy(),
        plan_of.contiguous().numpy(),
        live,
        alive is not None,
        program.depth,
    )
    threads = torch.get_num_threads()
    # each thread's running top-k, and one more for the nearest lists: keys; compacted at 1.5 k (at 2 k
    # the threshold lags: ~13% more rows are re-scored at 10%, at 1.25 k the compactions cost more
    # than they save)
    buf = np.empty((threads + 1, b, k + max(k // 2, 1)), dtype=np.uint64)
    sizes = np.zeros((threads + 1, b), dtype=np.int64)
    floor = np.zeros((threads + 1, b), dtype=np.uint64)  # threshold keys, 0: none yet
    qcodes, qscale = quantize_finite_rows(queries)  # the query side of the int8 cut
    padded = np.zeros((b, 4 * -(-d // 4)), dtype=np.int8)  # whole 32-bit words of 4 codes
    padded[:, :d] = qcodes.numpy()
    shared = (
        q,
        padded.view(np.int32),
        128 * padded.sum(1, dtype=np.int64),  # what the unsigned offset of tile_dots adds
        qscale.numpy(),
        codes_np,
        codes_np.view(np.int32) if d % 4 == 0 else np.zeros((0, 0), dtype=np.int32),
        scales_np,
        offsets,
        bounds.contiguous().numpy(),
    )

    by_plan = np.argsort(plan[4], kind="stable")  # the queries, those of one plan side by side

    def parts(lo: int, hi: int, slots: list[int]) -> list[tuple]:
        """The scan of probe ranks ``lo:hi``, in runs of lists the threads of ``slots`` claim."""
        heads, members, cuts = _bucket(probes_np, offsets, lo, hi, len(slots) * _RUNS_PER_THREAD, by_plan)
        busy = int(np.count_nonzero(heads[cuts[1:]] > heads[cuts[:-1]]))  # runs with (query, list) pairs
        claims = np.zeros(1, dtype=np.int64)  # the next run
        return [(*shared, heads, members, *plan, buf[t], sizes[t], floor, t, k, cuts, claims) for t in slots[:busy]]

    # each query's nearest list first: its k-th key there starts the cut of the rest (_scan_lists
    # raises every member's threshold to the best any thread holds). A few queries' nearest lists
    # take the calling thread less time than a helper takes to wake (tens of microseconds): it
    # scans them alone, in a buffer of its own, while the helpers wake and start on the rest.
    slots, probed = list(range(threads)), probes_np.shape[1]
    if b <= _FEW_QUERIES:
        rest = start_parts(_scan_lists, parts(1, probed, slots))
        run_parts(_scan_lists, parts(0, 1, [threads]))
    else:
        run_parts(_scan_lists, parts(0, 1, slots))
        rest = start_parts(_scan_lists, parts(1, probed, slots))
    finish_parts(rest)
    run_chunked(_merge, (buf, sizes, out_s, out_r), b, _MIN_QUERIES_PER_THREAD)
    return torch.from_numpy(out_s), torch.from_numpy(out_r)
