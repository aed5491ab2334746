"""The 16-row int8 kernels: ``tile_dots`` (VNNI, and its portable twin) and ``tile_masks`` against
numpy on random inputs."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.ops.cpu.vnni import HAS_VNNI, tile_dots, tile_dots_portable, tile_masks


@numba.njit
def _dots(codes, w0, stride, valid, qwords, count, portable):
    """Both tiles of 128-dim rows (two calls, the second adding), by either kernel."""
    acc = np.zeros(count * 16, np.int32)
    sel = np.arange(count)[::-1].copy()  # slot m scores query count - 1 - m
    for t in range(stride // 16):
        if portable:
            tile_dots_portable(codes, w0 + 16 * t, stride, valid, qwords, 16 * t, stride, sel, count, acc, t == 0)
        else:
            tile_dots(codes, w0 + 16 * t, stride, valid, qwords, 16 * t, stride, sel, count, acc, t == 0)
    return acc


@numba.njit
def _masks(acc, count, fixes, scales, s0, valid, cuts, chunks):
    """Each query's rows left, by query (0: none), and the slots listed, in order."""
    out = np.full(count, -1, np.int64)
    sel = np.arange(count)[::-1].copy()  # slot m cuts query count - 1 - m
    found = tile_masks(acc, sel, count, fixes, scales, s0, valid, cuts, chunks[::-1].copy(), out)
    rows = np.zeros(count, np.int64)
    for x in range(found):
        rows[count - 1 - (out[x] & 0xFFFFFFFF)] = out[x] >> 32
    return rows, out[:found] & 0xFFFFFFFF


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    d=st.sampled_from([64, 128]),
    valid=st.integers(1, 16),
    first=st.integers(0, 3),
    count=st.integers(1, 9),
)
def test_tile_dots_are_offset_dot_products(seed, d, valid, first, count) -> None:
    """``sum_d (code + 128) * q_d`` for rows ``first .. first + valid`` of a code matrix (rows past
    ``valid`` have codes 0: the matrix ends right after the valid rows, so reading one would be out
    of bounds); VNNI and portable agree."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(-128, 128, (first + valid, d)).astype(np.int8)
    q = rng.integers(-127, 128, (count, d)).astype(np.int8)
    want = np.repeat(128 * q.sum(1, dtype=np.int64)[:, None], 16, axis=1)
    want[:, :valid] = q.astype(np.int64) @ (codes[first:].astype(np.int64) + 128).T
    words, stride = codes.view(np.int32).reshape(-1), d // 4
    args = (words, first * stride, stride, valid, q.view(np.int32).reshape(-1), count)
    assert np.array_equal(_dots(*args, True).reshape(count, 16), want[::-1])
    if HAS_VNNI:
        assert np.array_equal(_dots(*args, False).reshape(count, 16), want[::-1])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), valid=st.integers(1, 16), s0=st.integers(0, 4), count=st.integers(1, 6))
def test_tile_masks_cut_each_querys_scaled_scores(seed, valid, s0, count) -> None:
    """Bit i of query m is set iff row i < valid scores ``(acc - fix) * scale >= cut`` in float32
    and is wanted (its chunk bit), cuts on the scores themselves (ties) and between them; exactly
    the slots with a bit left are listed, in slot order."""
    rng = np.random.default_rng(seed)
    acc = rng.integers(-(2**20), 2**20, (count, 16)).astype(np.int32)  # slot m: query count - 1 - m
    fixes = rng.integers(-(2**15), 2**15, count)
    scales = (rng.random(s0 + valid) + 0.01).astype(np.float32)
    scores = np.float32(acc - fixes[:, None])[:, :valid] * scales[s0:]
    cuts = np.array([rng.choice(row) + rng.choice([0, 0.5, -0.5]) for row in scores], dtype=np.float32)
    chunks = rng.choice([0, 0xFFFF, 0xFFFFFFFF, *rng.integers(0, 1 << 16, 3)], count).astype(np.uint64)
    want = [
        sum(1 << i for i in range(valid) if row[i] >= cut) & int(chunk) for row, cut, chunk in zip(scores, cuts, chunks)
    ]
    rows, slots = _masks(acc[::-1].reshape(-1), count, fixes, scales, s0, valid, cuts, chunks)
    assert rows.tolist() == want
    assert slots.tolist() == [count - 1 - q for q in range(count - 1, -1, -1) if want[q]]


@numba.njit
def _fast_only(codes, qwords, sel, acc):
    return tile_dots(codes, 0, 16, 16, qwords, 0, 16, sel, 1, acc, True)


@pytest.mark.skipif(not HAS_VNNI, reason="the CPU has no AVX-512 VNNI")
def test_the_fast_kernel_uses_vnni() -> None:
    """Compiled alone (``_dots`` holds the portable twin too), the fast kernel issues vpdpbusd."""
    args = (np.zeros(256, np.int32), np.zeros(16, np.int32), np.zeros(1, np.int64), np.zeros(16, np.int32))
    _fast_only(*args)
    assert "vpdpbusd" in "".join(_fast_only.inspect_asm().values())
