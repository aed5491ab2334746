"""Per-row symmetric int8 quantization (the query side of the int8 kernels): scales, codes, bad input."""

from __future__ import annotations

import pytest
import torch

from sterling.ops.quantize import QMAX, quantize_rows


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
