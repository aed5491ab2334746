"""nearest_lists: the CPU kernel against the matrix-product-and-stable-sort reference, on exact small
integer inputs (ties included: the same lists in the same order) and on random floats (the same
lists up to float32 rounding), with and without per-query counts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.ops.nearest_lists import Kernel, nearest_lists


@st.composite
def exact_problems(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Small integer components: every float32 dot product is exact, so both kernels see the same
    scores, many of them tied. ``layout`` "sampled" puts the largest scores on every 8th list (the
    kernel's sample), so the sampled cut keeps too few and the full selection runs."""
    b, c, d = draw(st.integers(1, 24)), draw(st.integers(1, 600)), draw(st.integers(1, 16))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    queries = torch.randint(-3, 4, (b, d), generator=gen).float()
    centroids = torch.randint(-3, 4, (c, d), generator=gen).float()
    if draw(st.sampled_from(["random", "sampled"])) == "sampled":
        queries = queries.abs() + 1
        centroids = centroids.abs()
        centroids[::8] += 4
    return queries, centroids, draw(st.integers(1, c))


@settings(max_examples=200, deadline=None)
@given(problem=exact_problems())
def test_cpu_matches_reference_on_exact_scores(problem: tuple[torch.Tensor, torch.Tensor, int]) -> None:
    queries, centroids, p = problem
    expected = nearest_lists(queries, centroids, p, kernel=Kernel.REFERENCE)
    assert expected.shape == (queries.shape[0], p)
    assert torch.equal(nearest_lists(queries, centroids, p, kernel=Kernel.CPU), expected)


@settings(max_examples=150, deadline=None)
@given(problem=exact_problems(), data=st.data())
def test_per_query_counts_keep_the_same_lists_and_the_nearest_first(
    problem: tuple[torch.Tensor, torch.Tensor, int], data: st.DataObject
) -> None:
    queries, centroids, p = problem
    b = queries.shape[0]
    counts = torch.tensor(data.draw(st.lists(st.integers(1, p), min_size=b, max_size=b)), dtype=torch.int64)
    expected = nearest_lists(queries, centroids, p, counts, kernel=Kernel.REFERENCE)
    got = nearest_lists(queries, centroids, p, counts, kernel=Kernel.CPU)
    assert torch.equal(got.sort(1).values, expected.sort(1).values)
    assert torch.equal(got[:, 0], expected[:, 0])
    assert torch.equal(got < 0, torch.arange(p) >= counts[:, None])


@settings(max_examples=100, deadline=None)
@given(
    b=st.integers(1, 40),
    c=st.integers(1, 1100),
    d=st.sampled_from([1, 7, 64]),
    scale=st.sampled_from([1e-20, 1.0, 1e10]),
    seed=st.integers(0, 2**31),
    data=st.data(),
)
def test_random_floats_pick_the_largest_products(b: int, c: int, d: int, scale: float, seed: int, data) -> None:
    """Each query's p lists are its p largest products up to float32 rounding of the sums: none left
    out scores above one kept (beyond the rounding), and the first is the largest."""
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(b, d, generator=gen) * scale
    centroids = torch.randn(c, d, generator=gen)
    p = data.draw(st.integers(1, c))
    got = nearest_lists(queries, centroids, p, kernel=Kernel.CPU)
    exact = queries.double() @ centroids.double().T  # [B, C]
    tol = 1e-5 * (queries.double().abs() @ centroids.double().abs().T).max(1, keepdim=True).values  # [B, 1]
    kept = torch.zeros(b, c, dtype=torch.bool).scatter_(1, got, True)
    assert torch.equal(kept.sum(1), torch.full((b,), p))  # p distinct lists
    worst_kept = exact.masked_fill(~kept, float("inf")).min(1, keepdim=True).values
    best_left = exact.masked_fill(kept, float("-inf")).max(1, keepdim=True).values
    assert bool((best_left <= worst_kept + tol).all())
    assert bool((exact.gather(1, got[:, :1]) >= exact.max(1, keepdim=True).values - tol).all())


def test_nearest_first_lower_list_on_ties() -> None:
    centroids = torch.tensor([[0.5], [2.0], [2.0], [-1.0], [3.0]])
    for kernel in (Kernel.REFERENCE, Kernel.CPU):
        assert nearest_lists(torch.ones(1, 1), centroids, 4, kernel=kernel).tolist() == [[4, 1, 2, 0]]
        assert nearest_lists(torch.ones(1, 1), centroids, 0, kernel=kernel).shape == (1, 0)


@pytest.mark.parametrize("kernel", [Kernel.REFERENCE, Kernel.CPU])
@pytest.mark.parametrize(
    ("queries", "centroids", "p", "message"),
    [
        (torch.zeros(3), torch.zeros(4, 3), 1, "queries must be float32 \\[B, D\\]"),
        (torch.zeros(2, 3, dtype=torch.float64), torch.zeros(4, 3), 1, "queries must be float32"),
        (torch.zeros(2, 3), torch.zeros(4, 2), 1, "centroids must be float32 \\[C, D\\] with D=3"),
        (torch.zeros(2, 3), torch.zeros(4, 3, dtype=torch.float16), 1, "centroids must be float32"),
        (torch.zeros(2, 3), torch.zeros(4, 3), 5, "p must be an int in \\[0, 4\\]"),
        (torch.zeros(2, 3), torch.zeros(4, 3), -1, "p must be an int"),
        (torch.zeros(2, 3), torch.zeros(4, 3), True, "p must be an int"),
        (torch.tensor([[0.0, float("nan")]]), torch.zeros(4, 2), 1, "queries hold NaN"),
        (torch.ones(1, 2), torch.tensor([[1.0, 0.0], [float("inf"), 0.0]]), 1, "not finite: non-finite centroids"),
        (torch.full((1, 2), 1e30), torch.full((3, 2), 1e30), 1, "float32 overflow"),
    ],
)
def test_bad_input(queries: torch.Tensor, centroids: torch.Tensor, p: int, message: str, kernel: Kernel) -> None:
    with pytest.raises(ValueError, match=message):
        nearest_lists(queries, centroids, p, kernel=kernel)


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        (torch.tensor([1, 2]), "counts must be int64 \\[B=3\\]"),
        (torch.tensor([1, 2, 2], dtype=torch.int32), "counts must be int64"),
        (torch.tensor([1, 0, 2]), "counts must lie in \\[1, p=2\\]"),
        (torch.tensor([1, 3, 2]), "counts must lie in \\[1, p=2\\]"),
    ],
)
def test_bad_counts(counts: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        nearest_lists(torch.zeros(3, 4), torch.zeros(5, 4), 2, counts)
