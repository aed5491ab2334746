"""The 16-row int8 block kernels: ``transpose16`` and ``block_mask`` (VNNI, and its portable twin)
against numpy on random inputs."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.ops.cpu.vnni import HAS_VNNI, block_mask, block_mask_portable, transpose16


@numba.njit
def _transpose(src, s_off, stride, dst, d_off):
    return transpose16(src, s_off, stride, dst, d_off)


@numba.njit
def _masks(tcodes, qwords, groups, qfix, scales, s0, valid, cut):
    return (
        block_mask(tcodes, 0, qwords, 0, groups, qfix, scales, s0, valid, cut),
        block_mask_portable(tcodes, 0, qwords, 0, groups, qfix, scales, s0, valid, cut),
    )


def _block(codes: np.ndarray) -> np.ndarray:
    """int32 [16 * G]: 16 rows of int8 codes [16, 4G] in the block layout, by ``transpose16``."""
    words = codes.view(np.int32)  # [16, G]
    groups = words.shape[1]
    out = np.zeros(16 * groups, dtype=np.int32)
    for t in range(groups // 16):
        _transpose(words.reshape(-1), 16 * t, groups, out, 256 * t)
    return out


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31), offset=st.integers(0, 5))
def test_transpose16_lays_rows_out_in_blocks(seed, offset) -> None:
    rng = np.random.default_rng(seed)
    src = rng.integers(-(2**31), 2**31, 16 * 20 + offset, dtype=np.int64).astype(np.int32)
    dst = np.zeros(256 + 3, dtype=np.int32)
    _transpose(src, offset, 20, dst, 3)  # rows of 20 words, the first 16 of each
    want = (src[offset : offset + 320].reshape(16, 20)[:, :16].view(np.uint32) ^ np.uint32(0x80808080)).T
    assert np.array_equal(dst[3:].view(np.uint32), want.reshape(-1)) and not dst[:3].any()


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    d=st.sampled_from([64, 128, 256]),
    valid=st.integers(1, 16),
    s0=st.integers(0, 4),
    quantile=st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]),
)
def test_block_mask_is_the_int8_score_cut(seed, d, valid, s0, quantile) -> None:
    """Bit i is set iff row i < valid scores ``dot(codes, q) * scale >= cut`` (float32), for cuts
    on the scores themselves (ties) and between them; VNNI and portable agree bit for bit."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(-128, 128, (16, d)).astype(np.int8)
    q = rng.integers(-127, 128, d).astype(np.int8)
    scales = (rng.random(s0 + 16) + 0.01).astype(np.float32)
    scores = np.float32(codes.astype(np.int64) @ q.astype(np.int64)) * scales[s0 : s0 + 16]
    cut = np.float32(np.quantile(scores[:valid], quantile, method="nearest"))
    want = sum(1 << i for i in range(valid) if scores[i] >= cut)
    fast, portable = _masks(
        _block(codes), q.view(np.int32), d // 4, 128 * int(q.sum(dtype=np.int64)), scales, s0, valid, cut
    )
    assert portable == want
    if HAS_VNNI:
        assert fast == want


@pytest.mark.skipif(not HAS_VNNI, reason="the CPU has no AVX-512 VNNI")
def test_the_fast_kernel_uses_vnni() -> None:
    asm = "".join(_masks.inspect_asm().values())
    assert "vpdpbusd" in asm
