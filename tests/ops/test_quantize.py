"""Per-row symmetric int8 quantization (the query side of the int8 kernels): scales, codes, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.ops.quantize import QMAX, int8_codes, quantize_rows
from sterling.ops.reference import quantize as reference


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 9), d=st.integers(0, 70), seed=st.integers(0, 2**31 - 1), halves=st.booleans())
def test_quantize_rows_equals_reference(n: int, d: int, seed: int, halves: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) * torch.rand(n, 1, generator=gen) * 100
    if halves and n and d:  # ties: components half a step between two codes, and a zero row
        x = torch.randint(-254, 255, (n, d), generator=gen).float() / 2
        x[:, 0] = 127.0
        x[0] = 0.0
    codes, scales = quantize_rows(x)
    want_codes, want_scales = reference.quantize_rows(x)
    assert torch.equal(scales, want_scales) and torch.equal(codes, want_codes)
    scale = torch.tensor([0.37])
    assert torch.equal(int8_codes(x, scale), (x / scale).round().clamp(-QMAX, QMAX).to(torch.int8))


def test_int8_codes_needs_one_scale_or_one_per_row() -> None:
    with pytest.raises(ValueError, match="one scale per row"):
        int8_codes(torch.ones(3, 2), torch.ones(2))


def test_one_scale_per_row() -> None:
    codes, scales = quantize_rows(torch.tensor([[1.0, 2.0], [-30.0, 3.0], [0.0, 0.0]]))
    torch.testing.assert_close(scales, torch.tensor([2.0 / QMAX, 30.0 / QMAX, 1.0]))
    assert codes.dtype == torch.int8 and codes.tolist() == [[64, 127], [-127, 13], [0, 0]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_is_an_error(bad: float) -> None:
    x = torch.zeros(3, 2)
    x[1, 1] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_rows(x)


def test_not_a_float_matrix_is_an_error() -> None:
    with pytest.raises(ValueError, match="float tensor"):
        quantize_rows(torch.ones(3, dtype=torch.float32))
    with pytest.raises(ValueError, match="float tensor"):
        quantize_rows(torch.ones(3, 2, dtype=torch.int64))
