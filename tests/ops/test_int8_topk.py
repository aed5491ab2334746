"""int8_topk: both kernels against brute force over the dequantized rows, on random inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.ops.test_filtered_topk import check_against_brute_force

from sterling.ops.cpu import int8_topk as cpu
from sterling.ops.int8_topk import Kernel, int8_topk


@st.composite
def problems(draw: st.DrawFn) -> tuple:
    b, n, d = draw(st.integers(1, 6)), draw(st.integers(0, 400)), draw(st.integers(1, 16))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if draw(st.booleans()):  # few distinct codes and one scale: many exact ties
        codes = torch.randint(-2, 3, (n, d), generator=gen, dtype=torch.int8)
        scales = torch.full((n,), 0.5)
    else:
        codes = torch.randint(-127, 128, (n, d), generator=gen, dtype=torch.int8)
        scales = torch.rand(n, generator=gen) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    queries = torch.randn(b, d, generator=gen) * draw(st.sampled_from([1e-4, 1.0, 1e3]))
    if draw(st.booleans()):
        queries[0] = 0.0
    rows = None
    if draw(st.booleans()):
        rows = torch.randperm(n, generator=gen)[: draw(st.integers(0, n))]
    return queries, codes, scales, rows, draw(st.integers(1, 60))


def check(queries, codes, scales, rows, k, kernel) -> None:
    scores, found = int8_topk(queries, codes, scales, rows, k, kernel=kernel)
    mask = None
    if rows is not None:
        mask = torch.zeros(codes.shape[0], dtype=torch.bool)
        mask[rows] = True
    items = codes.float() * scales[:, None]
    # float32 sums in another order: error relative to the sum of |terms|, not to the score
    atol = 1e-4 + 1e-5 * float((queries.abs() @ items.abs().T).max()) if len(items) else 1e-4
    check_against_brute_force(queries, items, mask, k, scores, found, atol=atol)


@settings(max_examples=300, deadline=None)
@given(problem=problems(), kernel=st.sampled_from([Kernel.CPU, Kernel.REFERENCE]))
def test_matches_brute_force(problem: tuple, kernel: Kernel) -> None:
    check(*problem, kernel)


@settings(max_examples=40, deadline=None)
@given(problem=problems())
def test_cpu_in_chunks_of_queries(problem: tuple) -> None:
    saved = cpu._MAX_SCORES
    cpu._MAX_SCORES = 7  # one or two queries per int32 score matrix
    try:
        check(*problem, Kernel.CPU)
    finally:
        cpu._MAX_SCORES = saved


def test_clustered_scores_keep_every_true_member() -> None:
    """Near-equal scores around the k-th (a dense cluster of items near the query): the cut keeps
    every row the query's rounding could reorder, so the result is still the exact top-k."""
    gen = torch.Generator().manual_seed(1)
    centre = torch.randn(64, generator=gen)
    x = centre + 0.01 * torch.randn(5000, 64, generator=gen)
    scales = x.abs().amax(1) / 127
    codes = torch.round(x / scales[:, None]).to(torch.int8)
    queries = centre + 0.3 * torch.randn(32, 64, generator=gen)
    check(queries, codes, scales, None, 100, Kernel.CPU)
    cpu_rows = int8_topk(queries, codes, scales, None, 100)[1]
    ref_rows = int8_topk(queries, codes, scales, None, 100, kernel=Kernel.REFERENCE)[1]
    items = codes.float() * scales[:, None]
    exact = queries @ items.T  # [32, 5000]
    # where the two kernels' rows differ, they are float32 near-ties swapped: equal exact scores
    atol = 1e-5 * float((queries.abs() @ items.abs().T).max())
    torch.testing.assert_close(exact.gather(1, cpu_rows), exact.gather(1, ref_rows), rtol=0, atol=atol)
    assert (cpu_rows == ref_rows).float().mean() > 0.9


@pytest.mark.parametrize(
    "args, message",
    [
        (
            (torch.randn(2, 3).double(), torch.zeros(4, 3, dtype=torch.int8), torch.ones(4), None, 1),
            "queries must be float32",
        ),
        (
            (torch.randn(2, 3), torch.zeros(4, 2, dtype=torch.int8), torch.ones(4), None, 1),
            r"codes must be int8 \[N, D\] with D=3",
        ),
        ((torch.randn(2, 3), torch.zeros(4, 3), torch.ones(4), None, 1), "codes must be int8"),
        (
            (torch.randn(2, 3), torch.zeros(4, 3, dtype=torch.int8), torch.ones(5), None, 1),
            r"scales must be float32 \[N\] with N=4",
        ),
        (
            (torch.full((2, 3), float("nan")), torch.zeros(4, 3, dtype=torch.int8), torch.ones(4), None, 1),
            "NaN or infinite",
        ),
        (
            (torch.randn(2, 3), torch.zeros(4, 3, dtype=torch.int8), torch.ones(4), torch.tensor([0, 4]), 1),
            r"rows must lie in \[0, 4\)",
        ),
        (
            (torch.randn(2, 3), torch.zeros(4, 3, dtype=torch.int8), torch.ones(4), torch.tensor([0.0]), 1),
            "rows must be int64",
        ),
        (
            (torch.randn(2, 3), torch.zeros(4, 3, dtype=torch.int8), torch.ones(4), None, 0),
            "k must be an int >= 1, got 0",
        ),
    ],
)
def test_validation(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        int8_topk(*args)
