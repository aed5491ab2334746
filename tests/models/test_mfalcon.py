"""M-FALCON: candidates scored against the history's cached keys and values, chunk by chunk, equal
one forward of ``[history ‖ candidates]`` with the target-aware mask and each candidate alone."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.models import jagged
from sterling.models.hstu import HSTU, HSTUConfig


def jagged_batch(gen: torch.Generator, lens: list[int], d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    offsets = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int64)
    values = torch.randn(int(offsets[-1]), d, generator=gen)
    ts = torch.randint(0, 10**7, (int(offsets[-1]),), generator=gen)
    return values, offsets, ts


@settings(max_examples=25, deadline=None)
@given(
    history=st.lists(st.integers(0, 12), min_size=1, max_size=4),
    data=st.data(),
    heads=st.sampled_from([1, 2]),
    chunk=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_candidates_against_cached_history_equal_the_one_pass_forward(history, data, heads, chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    d = 8
    torch.manual_seed(seed)
    model = HSTU(HSTUConfig(dim=d, num_layers=2, num_heads=heads, attention_dim=4, value_dim=4, norm_len=32)).eval()
    counts = data.draw(st.lists(st.integers(0, 7), min_size=len(history), max_size=len(history)))
    h, h_off, h_ts = jagged_batch(gen, history, d)
    c, c_off, _ = jagged_batch(gen, counts, d)
    request_ts = torch.randint(10**7, 2 * 10**7, (len(history),), generator=gen)
    row, _ = jagged.row_and_column(c_off)
    c_ts = request_ts[row]
    with torch.no_grad():
        fast = model.encode_candidates(h, h_off, h_ts, c, c_off, c_ts, chunk=chunk)  # [C, D]
        tokens, offsets, at = jagged.concat(h, h_off, c, c_off)
        ts, _, _ = jagged.concat(h_ts, h_off, c_ts, c_off)
        one_pass = model(tokens, offsets, ts, torch.tensor(counts))[at]
        torch.testing.assert_close(fast, one_pass, rtol=1e-4, atol=1e-5)
        for i in range(int(c_off[-1])):  # each candidate alone after its history
            b = int(row[i])
            lo, hi = int(h_off[b]), int(h_off[b + 1])
            alone = model(
                torch.cat([h[lo:hi], c[i : i + 1]]),
                torch.tensor([0, hi - lo + 1]),
                torch.cat([h_ts[lo:hi], c_ts[i : i + 1]]),
                torch.tensor([1]),
            )[-1]
            torch.testing.assert_close(fast[i], alone, rtol=1e-4, atol=1e-5)
