"""Jagged helpers against plain Python lists."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.models import jagged


def offsets_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int64)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=6), st.data())
def test_concat_padding_and_gather_match_lists(shape, data):
    a_len, b_len = [a for a, _ in shape], [b for _, b in shape]
    a, b = torch.arange(sum(a_len)) * 10, -1 - torch.arange(sum(b_len))
    a_off, b_off = offsets_of(a_len), offsets_of(b_len)
    out, off, b_at = jagged.concat(a, a_off, b, b_off)
    rows = [a[a_off[r] : a_off[r + 1]].tolist() + b[b_off[r] : b_off[r + 1]].tolist() for r in range(len(shape))]
    assert [out[off[r] : off[r + 1]].tolist() for r in range(len(shape))] == rows
    assert torch.equal(out[b_at], b)
    padded = jagged.to_padded(out.view(-1, 1), off)
    assert padded.shape[:2] == (len(shape), max(len(r) for r in rows))
    assert torch.equal(jagged.from_padded(padded, off).view(-1), out)
    picks = data.draw(st.lists(st.integers(0, len(shape) - 1), max_size=8))
    index, new_off = jagged.gather_rows(off, torch.tensor(picks, dtype=torch.int64))
    got = out[index]
    assert [got[new_off[i] : new_off[i + 1]].tolist() for i in range(len(picks))] == [rows[p] for p in picks]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=6), st.booleans())
def test_next_values_match_lists(lengths, with_last):
    values = torch.arange(sum(lengths)) * 10 + 1
    last = -1 - torch.arange(len(lengths)) if with_last else None
    off = offsets_of(lengths)
    got = jagged.next_values(values, off, last)
    want = []
    for r in range(len(lengths)):
        row = values[off[r] : off[r + 1]].tolist()
        want += row[1:] + ([int(last[r]) if with_last else row[-1]] if row else [])
    assert got.tolist() == want
