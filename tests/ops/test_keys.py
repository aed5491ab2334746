"""The 64-bit (score, row) keys of the CPU kernels: ``sort_descending`` and ``select_largest``
against numpy on random keys, duplicates included, on both sides of the rank sort's size limit."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.ops.cpu.keys import _RANK_SORT_MAX, select_largest, sort_descending


@st.composite
def key_arrays(draw: st.DrawFn) -> np.ndarray:
    n = draw(st.sampled_from([0, 1, 2, 17, 100, _RANK_SORT_MAX, _RANK_SORT_MAX + 1, 600]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    if draw(st.booleans()):  # few distinct values: many equal keys
        return rng.integers(0, 4, n).astype(np.uint64)
    return rng.integers(0, 2**64 - 1, n, dtype=np.uint64)


@settings(max_examples=80, deadline=None)
@given(keys=key_arrays(), extra=st.integers(0, 3))
def test_sort_descending_matches_numpy(keys: np.ndarray, extra: int) -> None:
    """Sorts the first n keys of a longer array into the first n slots of another."""
    n = len(keys)
    padded = np.concatenate([keys, np.full(extra, 7, np.uint64)])
    out = np.full(n + extra, 3, np.uint64)
    sort_descending(padded, n, out)
    assert np.array_equal(out[:n], np.sort(keys)[::-1])
    assert np.array_equal(out[n:], np.full(extra, 3, np.uint64))


@settings(max_examples=80, deadline=None)
@given(keys=key_arrays(), data=st.data())
def test_select_largest_keeps_the_k_largest(keys: np.ndarray, data: st.DataObject) -> None:
    n = len(keys)
    k = data.draw(st.integers(0, n))
    work = keys.copy()
    select_largest(work, n, k)
    assert np.array_equal(np.sort(work[:k]), np.sort(keys)[n - k :])
    assert np.array_equal(np.sort(work), np.sort(keys))  # a permutation
