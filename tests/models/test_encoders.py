"""HSTU and SASRec user towers: the target-aware mask, padding independence, positions."""

import pytest
import torch

from sterling.models.hstu import HSTU, HSTUConfig, target_aware_mask, token_positions
from sterling.models.sasrec import SASRec, SASRecConfig


def encoders():
    torch.manual_seed(0)
    return [
        HSTU(HSTUConfig(dim=8, num_heads=2, attention_dim=4, value_dim=4, norm_len=32, dropout=0.0)).eval(),
        SASRec(SASRecConfig(dim=8, num_heads=2, max_len=32, dropout=0.0)).eval(),
    ]


def test_mask_and_positions():
    offsets, targets = torch.tensor([0, 5, 7]), torch.tensor([2, 0])
    m = target_aware_mask(offsets, targets, 5)
    history = [[j <= i for j in range(5)] if i < 3 else [j < 3 or j == i for j in range(5)] for i in range(5)]
    assert m[0].tolist() == [[bool(v) for v in row] for row in history]
    assert m[1, :2, :2].tolist() == [[True, False], [True, True]] and not m[1, 2:].any() and not m[1, :, 2:].any()
    assert token_positions(offsets, targets).tolist() == [0, 1, 2, 3, 3, 0, 1]


@pytest.mark.parametrize("index", [0, 1])
def test_history_never_sees_candidates_and_batching_changes_nothing(index):
    enc = encoders()[index]
    gen = torch.Generator().manual_seed(3)
    x, ts = torch.randn(9, 8, generator=gen), torch.arange(9) * 100
    offsets, targets = torch.tensor([0, 6, 9]), torch.tensor([2, 1])
    out = enc(x, offsets, ts, targets)
    y = x.clone()
    y[4:6] += 1.0  # the candidates of sequence 0
    again = enc(y, offsets, ts, targets)
    torch.testing.assert_close(again[:4], out[:4])  # its history is untouched
    torch.testing.assert_close(again[6:], out[6:])  # so is the other sequence
    alone = enc(x[6:], torch.tensor([0, 3]), ts[6:], targets[1:])
    torch.testing.assert_close(alone, out[6:], rtol=1e-5, atol=1e-6)  # no padding effect


def test_sasrec_heads_must_divide_dim():
    with pytest.raises(ValueError, match="dim 10 is not divisible by num_heads 3"):
        SASRec(SASRecConfig(dim=10, num_heads=3))
