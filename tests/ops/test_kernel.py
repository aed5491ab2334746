import pytest
import torch

from sterling.ops.filtered_topk import filtered_topk
from sterling.ops.kernel import Kernel


def test_an_op_without_a_kernel_says_which_it_has():
    with pytest.raises(ValueError, match="filtered_topk has no triton kernel .available: reference"):
        filtered_topk(torch.randn(2, 4), torch.randn(5, 4), None, 3, kernel=Kernel.TRITON)
