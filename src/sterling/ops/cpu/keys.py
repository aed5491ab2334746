"""Running top-k in 64-bit keys (numba): a (score, row) pair as one ordered integer, quickselect.

The CPU kernels keep each query's best rows in a buffer of :func:`key` values, append a row only
when its key is above the buffer's threshold, and :func:`compact` a full buffer back to its k best.
A key orders by score, then by the lower row, so the top-k is one set whatever order the rows come
in (threads, batches).
"""

from __future__ import annotations

import numba
import numpy as np

from sterling.ops.cpu.bits import bits_float, float_bits

__all__ = ["compact", "key", "key_row", "key_score", "select_largest", "sort_descending"]

_RANK_SORT_MAX = 256  # longer runs are sorted by numpy's sort (quadratic work catches up near 400)


@numba.njit(nogil=True, cache=True, inline="always")
def key(score, r):
    """uint64 ordering (score, row) totally: the float's bits made order-preserving in the high
    half, ``2^32 - 1 - r`` in the low half, so of equal scores the lower row is the larger key. Every
    key of a real score is above 0, the empty threshold."""
    bits = np.uint64(float_bits(score + np.float32(0)))  # -0.0 + 0 is +0.0: one zero
    bits = (bits ^ np.uint64(0xFFFFFFFF)) if bits & np.uint64(0x80000000) else (bits | np.uint64(0x80000000))
    return (bits << np.uint64(32)) | (np.uint64(0xFFFFFFFF) - np.uint64(r))


@numba.njit(nogil=True, cache=True, inline="always")
def key_score(value):
    """The score of a key."""
    bits = value >> np.uint64(32)
    bits = (bits ^ np.uint64(0x80000000)) if bits & np.uint64(0x80000000) else (bits ^ np.uint64(0xFFFFFFFF))
    return bits_float(np.uint32(bits))


@numba.njit(nogil=True, cache=True, inline="always")
def key_row(value):
    """The row of a key."""
    return np.int64(np.uint64(0xFFFFFFFF) - (value & np.uint64(0xFFFFFFFF)))


@numba.njit(nogil=True, cache=True)
def select_largest(keys, n, k):
    """Quickselect: reorders ``keys[:n]`` so that ``keys[:k]`` holds the k largest (in no order).
    Each pass partitions without a data-dependent branch (every element is swapped, the split
    point advances by the comparison), so a random buffer costs no mispredicted jumps."""
    lo = 0
    hi = n
    while hi - lo > 1:
        a, b, c = keys[lo], keys[(lo + hi) >> 1], keys[hi - 1]
        pivot = max(min(a, b), min(max(a, b), c))  # median of three
        split = lo
        for i in range(lo, hi):  # keys[lo:split] > pivot >= keys[split:i + 1]
            v = keys[i]
            keys[i] = keys[split]
            keys[split] = v
            split += v > pivot
        if split > k:
            hi = split
        elif split == k:
            return
        else:  # keys[:split] are among the k largest, and so is the pivot, the largest of the rest
            for i in range(split, hi):
                if keys[i] == pivot:
                    keys[i] = keys[split]
                    keys[split] = pivot
                    break
            lo = split + 1
            if lo == k:
                return


@numba.njit(nogil=True, cache=True)
def sort_descending(keys, n, out):
    """``out[:n]`` = ``keys[:n]`` largest first (equal keys in their order). Up to
    ``_RANK_SORT_MAX`` keys, each goes straight to its rank, the count of larger keys plus that of
    equal keys before it: n² compares without a branch, vectorised, 3x faster at n = 100 than a
    quicksort's mispredicted jumps (the larger keys are counted over all n: a loop LLVM
    vectorises whatever n is); beyond, numpy's sort."""
    if n > _RANK_SORT_MAX:
        out[:n] = np.sort(keys[:n])[::-1]
        return
    for i in range(n):
        v = keys[i]
        rank = 0
        for j in range(n):
            rank += keys[j] > v
        for j in range(i):
            rank += keys[j] == v
        out[rank] = v


@numba.njit(nogil=True, cache=True)
def compact(buf, b, k):
    """Cuts query ``b``'s full buffer of keys ``buf[b]`` (:func:`key`) back to its k best
    (quickselect) and returns the k-th, the new threshold key: a row is offered (appended) only
    when its key is above the threshold."""
    keys = buf[b]
    select_largest(keys, keys.shape[0], k)
    threshold = keys[0]
    for i in range(1, k):
        threshold = min(threshold, keys[i])
    return threshold
