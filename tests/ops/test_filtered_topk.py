"""filtered_topk against a brute-force oracle: full score matrix, mask, sort."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.ops.filtered_topk import Kernel, filtered_topk
from sterling.ops.reference import filtered_topk as reference


def check_against_brute_force(
    queries: torch.Tensor,
    items: torch.Tensor,
    mask: torch.Tensor | None,
    k: int,
    scores: torch.Tensor,
    rows: torch.Tensor,
    atol: float = 1e-4,
) -> None:
    """Ties aside: the right count, passing distinct rows, exact scores (to ``atol``), descending,
    and no passing item left out that scores above the last one returned."""
    b, n = queries.shape[0], items.shape[0]
    exact = queries.double() @ items.double().T  # [B, N]
    passing = torch.ones(b, n, dtype=torch.bool) if mask is None else mask.expand(b, n)
    assert scores.shape == (b, k) and rows.shape == (b, k) and rows.dtype == torch.int64
    for i in range(b):
        count = min(k, int(passing[i].sum()))
        got = rows[i, :count]
        assert (rows[i, count:] == -1).all() and torch.isneginf(scores[i, count:]).all()
        assert (got >= 0).all() and len(set(got.tolist())) == count
        assert passing[i, got].all()
        torch.testing.assert_close(scores[i, :count].double(), exact[i, got], rtol=1e-5, atol=atol)
        assert (scores[i, :count].diff() <= 0).all()
        left = passing[i].clone()
        left[got] = False
        if count and left.any():
            assert exact[i, left].max() <= exact[i, got].min() + atol


@st.composite
def problems(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int, int]:
    b, n, d = draw(st.integers(1, 5)), draw(st.integers(0, 300)), draw(st.integers(1, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if draw(st.booleans()):  # small integers: exact ties
        queries = torch.randint(-2, 3, (b, d), generator=gen).float()
        items = torch.randint(-2, 3, (n, d), generator=gen).float()
    else:
        queries, items = torch.randn(b, d, generator=gen), torch.randn(n, d, generator=gen)
    shape = draw(st.sampled_from([None, (n,), (b, n)]))
    if shape is None:
        mask = None
    else:
        density = draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]))
        mask = torch.rand(shape, generator=gen) < density
    return queries, items, mask, draw(st.integers(1, 40)), draw(st.integers(1, 100))


@settings(max_examples=300, deadline=None)
@given(problem=problems())
def test_matches_brute_force(problem: tuple) -> None:
    queries, items, mask, k, block = problem
    scores, rows = filtered_topk(queries, items, mask, k, block=block)
    check_against_brute_force(queries, items, mask, k, scores, rows)
    again = filtered_topk(queries, items, mask, k, block=block)
    assert torch.equal(again[0], scores) and torch.equal(again[1], rows)


@settings(max_examples=50, deadline=None)
@given(problem=problems())
def test_block_size_does_not_change_scores(problem: tuple) -> None:
    queries, items, mask, k, block = problem
    one_block = filtered_topk(queries, items, mask, k, block=max(1, items.shape[0]))
    blocked = filtered_topk(queries, items, mask, k, block=block)
    torch.testing.assert_close(blocked[0], one_block[0])


def test_shared_and_per_query_mask_agree() -> None:
    gen = torch.Generator().manual_seed(0)
    queries, items = torch.randn(3, 4, generator=gen), torch.randn(50, 4, generator=gen)
    mask = torch.rand(50, generator=gen) < 0.3
    shared = filtered_topk(queries, items, mask, 7, block=8)
    per_query = filtered_topk(queries, items, mask.expand(3, 50).clone(), 7, block=8)
    assert torch.equal(shared[1], per_query[1])
    torch.testing.assert_close(shared[0], per_query[0])


def test_kernel_selection() -> None:
    queries, items = torch.randn(2, 3), torch.randn(10, 3)
    expected = reference.filtered_topk(queries, items, None, 4)
    for kernel in (Kernel.REFERENCE, "reference"):
        got = filtered_topk(queries, items, None, 4, kernel=kernel)  # type: ignore[arg-type]
        assert torch.equal(got[1], expected[1])
    with pytest.raises(ValueError, match="'cuda' is not a valid Kernel"):
        filtered_topk(queries, items, None, 4, kernel="cuda")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            (torch.randn(2, 3), torch.randn(5, 4), None, 1),
            r"must share D, got \[2, 3\] and \[5, 4\]",
        ),
        ((torch.randn(3), torch.randn(5, 3), None, 1), "must share D"),
        ((torch.randn(2, 3), torch.randn(5, 3).double(), None, 1), "must share a float dtype"),
        (
            (torch.ones(2, 3, dtype=torch.long), torch.ones(5, 3, dtype=torch.long), None, 1),
            "float dtype",
        ),
        (
            (torch.randn(2, 3), torch.randn(5, 3), torch.ones(4, dtype=torch.bool), 1),
            r"mask must be bool \[N\]",
        ),
        ((torch.randn(2, 3), torch.randn(5, 3), torch.ones(3, 5, dtype=torch.bool), 1), "B=2, N=5"),
        ((torch.randn(2, 3), torch.randn(5, 3), torch.ones(5), 1), "got torch.float32"),
        ((torch.randn(2, 3), torch.randn(5, 3), None, 0), "k must be an int >= 1, got 0"),
        ((torch.randn(2, 3), torch.randn(5, 3), None, 2.0), "k must be an int >= 1"),
    ],
)
def test_validation(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        filtered_topk(*args)


def test_block_validation() -> None:
    with pytest.raises(ValueError, match="block must be an int >= 1, got 0"):
        filtered_topk(torch.randn(1, 2), torch.randn(3, 2), None, 1, block=0)
