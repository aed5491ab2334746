"""Symmetric int8 quantization: error bounds, code range, scales, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.index.quant import Int8Codes, dequantize, quantize


@st.composite
def matrices(draw: st.DrawFn) -> torch.Tensor:
    n, d = draw(st.integers(0, 20)), draw(st.integers(1, 16))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = torch.randn(n, d, generator=gen) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    if n and draw(st.booleans()):
        x[0] = 0.0  # an all-zero row
    return x


@settings(max_examples=100, deadline=None)
@given(matrices(), st.booleans())
def test_error_bound_and_range(x: torch.Tensor, per_item: bool) -> None:
    q = quantize(x, per_item=per_item)
    n = x.shape[0]
    assert q.codes.dtype == torch.int8 and q.codes.shape == x.shape
    assert q.scales.dtype == torch.float32 and q.scales.shape == ((n,) if per_item else (1,))
    assert (q.scales > 0).all()
    assert (q.codes.abs() <= 127).all()
    err = (dequantize(q) - x).abs()
    bound = (q.scales[:, None] if per_item else q.scales) * 0.5 * (1 + 1e-5)
    assert (err <= bound + 1e-30).all()
    if per_item and n:  # every nonzero row uses the full range
        nonzero = x.abs().amax(1) > 0
        assert (q.codes.abs().amax(1)[nonzero] == 127).all()
        assert (q.codes[~nonzero] == 0).all()


def test_global_scale_is_global_max() -> None:
    x = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    q = quantize(x, per_item=False)
    assert q.scales.item() == pytest.approx(4.0 / 127)
    assert q.codes[0, 1] == -127 and q.codes[1, 0] == round(2 * 127 / 4)


def test_fixed_scale_clamps() -> None:
    q = quantize(torch.tensor([[10.0, -10.0, 0.05]]), scale=0.01)
    assert q.codes.tolist() == [[127, -127, 5]]
    with pytest.raises(ValueError):
        quantize(torch.ones(1, 2), scale=0.0)


def test_take_and_row_scales() -> None:
    x = torch.randn(6, 3)
    per, glob = quantize(x), quantize(x, per_item=False)
    rows = torch.tensor([4, 0, 4])
    assert torch.equal(per.take(rows).codes, per.codes[rows])
    assert torch.equal(per.take(rows).scales, per.scales[rows])
    assert torch.equal(glob.take(rows).scales, glob.scales)
    assert glob.row_scales().shape == (6,) and per.nbytes() == 6 * 3 + 6 * 4


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_is_an_error(bad: float) -> None:
    x = torch.zeros(3, 2)
    x[1, 1] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize(x)


def test_bad_shapes_and_dtypes() -> None:
    with pytest.raises(ValueError):
        quantize(torch.ones(3))
    with pytest.raises(ValueError):
        quantize(torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError):
        Int8Codes(torch.zeros(2, 2, dtype=torch.int8), torch.ones(3))
