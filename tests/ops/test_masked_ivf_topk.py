"""The tensor-only masked IVF top-k: against a plain per-query oracle, and under torch.export."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sterling.ops.plan_program import pack_rows
from sterling.ops.reference.masked_ivf_topk import masked_ivf_topk


def random_inputs(n: int, d: int, c: int, b: int, density: float, seed: int) -> dict[str, torch.Tensor]:
    """A random index of n rows in c lists (rows list-sorted) and b queries with allowed words."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "queries": torch.randn(b, d, generator=gen),
        "centroids": torch.randn(c, d, generator=gen),
        "row_list": torch.randint(c, (n,), generator=gen).sort().values,
        "codes": torch.randint(-127, 128, (n, d), generator=gen, dtype=torch.int8),
        "scales": torch.rand(n, generator=gen) * 0.1 + 1e-3,
        "allowed": torch.stack([pack_rows(torch.rand(n, generator=gen) < density) for _ in range(b)])
        if b
        else torch.zeros(0, (n + 63) // 64, dtype=torch.int64),
    }


def oracle(x: dict[str, torch.Tensor], probes: list[int], k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Per query, plainly: the lists probed after widening, its allowed rows there, their scores
    (descending) and the eligible rows."""
    queries, centroids, row_list = x["queries"], x["centroids"], x["row_list"]
    n, c = len(row_list), len(centroids)
    near = queries @ centroids.T
    eligible, best = [], []
    for b in range(len(queries)):
        allowed = [bool((int(x["allowed"][b, r // 64]) >> (r % 64)) & 1) for r in range(n)]
        order = sorted(range(c), key=lambda j: -float(near[b, j]))
        p = min(probes[b], c)
        while True:
            lists = set(order[:p])
            rows = [r for r in range(n) if allowed[r] and int(row_list[r]) in lists]
            if p == 0 or p == c or len(rows) >= min(k, n):
                break
            p = min(c, 4 * p)
        scores = sorted(
            (float(x["codes"][r].double() @ queries[b].double()) * float(x["scales"][r]) for r in rows), reverse=True
        )
        eligible.append(rows)
        best.append(scores[:k])
    return eligible, best


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.one_of(st.sampled_from([0, 1, 63, 64, 65]), st.integers(0, 200), st.integers(1000, 3000)),
    d=st.integers(1, 32),
    c=st.integers(1, 64),
    b=st.integers(1, 5),
    density=st.sampled_from([0.0, 0.01, 0.5, 1.0]),
    data=st.data(),
    seed=st.integers(0, 2**31),
)
def test_matches_per_query_oracle(n, d, c, b, density, data, seed):
    x = random_inputs(n, d, c, b, density, seed)
    k = data.draw(st.integers(1, n + 5))
    probes = data.draw(
        st.lists(st.sampled_from([0, 1, 2, 3, c - 1, c, c + 7]).map(lambda p: max(p, 0)), min_size=b, max_size=b)
    )
    scores, rows = masked_ivf_topk(**x, probes=torch.tensor(probes, dtype=torch.int64), k=k)
    assert scores.shape == rows.shape == (b, k) and scores.dtype == torch.float32 and rows.dtype == torch.int64
    eligible, best = oracle(x, probes, k)
    for i in range(b):
        m = len(best[i])
        got = rows[i, :m].tolist()
        assert (rows[i, m:] == -1).all() and torch.isneginf(scores[i, m:]).all()
        assert len(set(got)) == m and set(got) <= set(eligible[i])  # up to ties: the right count of eligible rows
        torch.testing.assert_close(
            scores[i, :m].double(), torch.tensor(best[i], dtype=torch.float64), rtol=1e-5, atol=1e-5
        )  # ...scoring the oracle's best
        own = (x["codes"][got].double() @ x["queries"][i].double()) * x["scales"][got].double()
        torch.testing.assert_close(scores[i, :m].double(), own, rtol=1e-5, atol=1e-5)  # ...and their own


def test_widening_and_padding_by_hand():
    # rows 0-1 in list 0, rows 2-3 in list 1 (the query's nearest); row r scores r + 1; row 2 masked
    x = {
        "queries": torch.tensor([[1.0, 0.0]]),
        "centroids": torch.tensor([[-1.0, 0.0], [1.0, 0.0]]),
        "row_list": torch.tensor([0, 0, 1, 1]),
        "codes": torch.tensor([[1, 0], [2, 0], [3, 0], [4, 0]], dtype=torch.int8),
        "scales": torch.ones(4),
        "allowed": pack_rows(torch.tensor([True, True, False, True])).view(1, -1),
    }

    def run(p, k):
        scores, rows = masked_ivf_topk(**x, probes=torch.tensor([p]), k=k)
        return rows[0].tolist(), scores[0].tolist()

    inf = float("inf")
    assert run(1, 1) == ([3], [4.0])  # list 1 holds one allowed row: enough for k = 1
    assert run(1, 2) == ([3, 1], [4.0, 2.0])  # not for k = 2: widened to both lists
    assert run(0, 2) == ([-1, -1], [-inf, -inf])  # nothing probed
    assert run(9, 6) == ([3, 1, 0, -1, -1, -1], [4.0, 2.0, 1.0, -inf, -inf, -inf])  # all lists; k > N pads
    empty = {"queries": torch.zeros(0, 2), "allowed": torch.zeros(0, 1, dtype=torch.int64)}
    scores, rows = masked_ivf_topk(**{**x, **empty}, probes=torch.zeros(0, dtype=torch.int64), k=3)
    assert scores.shape == rows.shape == (0, 3)


@pytest.mark.parametrize("k", [3, 50])
def test_exports_with_a_dynamic_batch(k):
    x = random_inputs(300, 8, 6, 3, 0.5, seed=1)

    class Search(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name in ("centroids", "row_list", "codes", "scales"):
                self.register_buffer(name, x[name])

        def forward(self, queries, probes, allowed):
            return masked_ivf_topk(queries, self.centroids, self.row_list, self.codes, self.scales, probes, allowed, k)

    batch = torch.export.Dim("batch", min=1, max=1024)
    example = (x["queries"], torch.tensor([1, 2, 6]), x["allowed"])
    program = torch.export.export(Search(), example, dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    for b, seed in ((1, 2), (3, 3), (9, 4)):
        y = random_inputs(300, 8, 6, b, 0.3, seed)
        probes = torch.randint(0, 8, (b,), generator=torch.Generator().manual_seed(seed))
        want = Search()(y["queries"], probes, y["allowed"])
        got = program.module()(y["queries"], probes, y["allowed"])
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
