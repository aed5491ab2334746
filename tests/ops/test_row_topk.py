"""row_topk: the CPU kernel against the stable-sort reference on random rows, ties included."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.ops.row_topk import Kernel, row_topk


@st.composite
def problems(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    b, c = draw(st.integers(0, 40)), draw(st.integers(1, 300))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if draw(st.booleans()):  # few distinct values (and both zeros): many ties
        scores = torch.randint(-2, 3, (b, c), generator=gen).float()
        scores[scores == 0] = torch.tensor([0.0, -0.0])[torch.randint(0, 2, (int((scores == 0).sum()),), generator=gen)]
    else:
        scores = torch.randn(b, c, generator=gen) * draw(st.sampled_from([1e-30, 1.0, 1e30]))
    return scores, draw(st.integers(0, c))


@settings(max_examples=300, deadline=None)
@given(problem=problems())
def test_cpu_matches_reference(problem: tuple[torch.Tensor, int]) -> None:
    scores, k = problem
    expected = row_topk(scores, k, kernel=Kernel.REFERENCE)
    assert torch.equal(row_topk(scores, k, kernel=Kernel.CPU), expected)
    assert expected.shape == (scores.shape[0], k)


def test_nearest_first_lower_column_on_ties() -> None:
    scores = torch.tensor([[0.5, 2.0, 2.0, -1.0, 3.0]])
    assert row_topk(scores, 4).tolist() == [[4, 1, 2, 0]]


@pytest.mark.parametrize(
    ("scores", "k", "message"),
    [
        (torch.zeros(3), 1, "float32 \\[B, C\\]"),
        (torch.zeros(2, 3, dtype=torch.float64), 1, "float32 \\[B, C\\]"),
        (torch.zeros(2, 3), 4, "k must be an int in \\[0, 3\\]"),
        (torch.zeros(2, 3), -1, "k must be an int"),
        (torch.zeros(2, 3), True, "k must be an int"),
        (torch.tensor([[0.0, float("nan")]]), 1, "finite"),
    ],
)
def test_bad_input(scores: torch.Tensor, k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        row_topk(scores, k)


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        (torch.tensor([1, 2]), "counts must be int64 \\[B=3\\]"),
        (torch.tensor([1, 2, 2], dtype=torch.int32), "counts must be int64"),
        (torch.tensor([1, 0, 2]), "counts must lie in \\[1, k=2\\]"),
        (torch.tensor([1, 3, 2]), "counts must lie in \\[1, k=2\\]"),
    ],
)
def test_bad_counts(counts: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        row_topk(torch.zeros(3, 4), 2, counts)


@settings(max_examples=150, deadline=None)
@given(problem=problems(), data=st.data())
def test_per_row_counts_keep_the_same_columns_and_the_largest_first(problem: tuple[torch.Tensor, int], data) -> None:
    scores, k = problem
    b = scores.shape[0]
    counts = torch.tensor(data.draw(st.lists(st.integers(min(k, 1), k), min_size=b, max_size=b)), dtype=torch.int64)
    expected = row_topk(scores, k, counts, kernel=Kernel.REFERENCE)
    got = row_topk(scores, k, counts, kernel=Kernel.CPU)
    assert torch.equal(got.sort(1).values, expected.sort(1).values)
    assert torch.equal(got[:, :1], expected[:, :1])
    assert torch.equal(got < 0, torch.arange(k) >= counts[:, None])
