"""HSTU and SASRec user towers: the target-aware mask, padding independence, positions."""

import pytest
import torch

from sterling.models.hstu import HSTU, HSTUConfig, relative_index, target_aware_mask, token_positions
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


def test_relative_index_reads_each_query_time_against_each_key_time():
    gen = torch.Generator().manual_seed(5)
    pos = torch.arange(6)[None].repeat(2, 1)
    ts = torch.randint(0, 10**7, (2, 6), generator=gen)
    query = ts + torch.randint(0, 10**6, (2, 6), generator=gen)
    got = relative_index(pos, ts, norm_len=4, buckets=64, query_timestamps=query)
    for b in range(2):
        for i in range(6):
            for j in range(6):
                gap = min(max(i - j, 0), 3)
                dt = max(abs(int(query[b, i]) - int(ts[b, j])), 1)
                bucket = min(int(torch.log(torch.tensor(float(dt))) / 0.301), 63)
                assert got[b, i, j] == gap * 64 + bucket
    torch.testing.assert_close(relative_index(pos, ts, 4, 64, ts), relative_index(pos, ts, 4, 64))


def test_hstu_query_times_change_only_the_queries_given_them():
    enc = encoders()[0]
    gen = torch.Generator().manual_seed(4)
    x, ts = torch.randn(9, 8, generator=gen), torch.arange(9) * 100
    offsets, none = torch.tensor([0, 6, 9]), torch.zeros(2, dtype=torch.int64)
    out = enc(x, offsets, ts, none)
    torch.testing.assert_close(enc(x, offsets, ts, none, query_timestamps=ts), out, rtol=0, atol=0)
    later = ts.clone()
    later[7] += 10**6  # token 7 asks much later
    moved = enc(x, offsets, ts, none, query_timestamps=later)
    torch.testing.assert_close(moved[:7], out[:7])  # causal: no earlier token, no other sequence reads it
    assert not torch.allclose(moved[7], out[7])
