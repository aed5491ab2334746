"""SilverTorch segment search: exact with respect to the filter, never starved, exact at full probe."""

import random

import pytest
import torch
from filter_oracle import catalogues, filter_trees, oracle, render, schema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sterling.index.attributes import AttributeStore
from sterling.index.bloom import BloomConfig
from sterling.index.config import IndexConfig, auto_nlist
from sterling.index.segment import Segment
from sterling.ops.kernel import Kernel
from sterling.ops.plan_program import pack_rows

try:  # the Triton scan (on CPU tensors under the interpreter, see tests/conftest.py)
    import triton  # noqa: F401

    KERNELS = [Kernel.REFERENCE, Kernel.CPU, Kernel.TRITON]
except ImportError:
    KERNELS = [Kernel.REFERENCE, Kernel.CPU]


def clustered(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, d, generator=gen)
    return centres[torch.randint(5, (n,), generator=gen)] + 0.3 * torch.randn(n, d, generator=gen)


@st.composite
def cases(draw):
    catalogue = draw(catalogues(max_size=150, anchored=True).filter(lambda c: len(c) >= 8))
    n = len(catalogue)
    cfg = IndexConfig(
        nlist=draw(st.integers(2, min(6, n))),
        nprobe=draw(st.integers(1, 3)),
        scan_selectivity=draw(st.sampled_from([0.0, 0.05, 0.3])),
        min_candidates=draw(st.sampled_from([0.0, 16.0])),
        gather_queries=draw(st.sampled_from([1, 64])),
        gather_cost=draw(st.sampled_from([0.0, 6.0, 1e9])),
        gather_fixed=draw(st.sampled_from([0.0, 6.0])),
        sample_size=draw(st.sampled_from([4, 64])),
        bloom=BloomConfig(
            dedicated_bits=draw(st.sampled_from([0, 2, 64])),
            bits_per_term=draw(st.sampled_from([1.0, 10.0])),
            min_hashed_width=draw(st.sampled_from([1, 64])),
        ),
        kernel=draw(st.sampled_from(KERNELS)),
    )
    kinds = schema(catalogue)
    b = draw(st.integers(1, 5))
    trees = [draw(st.one_of(st.none(), filter_trees(kinds))) for _ in range(b)]
    rnd = random.Random(draw(st.integers(0, 2**16)))
    filters = [None if t is None else render(t, rnd) for t in trees]
    return catalogue, cfg, trees, filters, draw(st.integers(1, 12)), draw(st.integers(0, 2**16))


def passing_rows(seg, catalogue, tree, kinds, alive=None):
    ok = [tree is None or oracle(tree, catalogue[int(i)], kinds) for i in seg.ids]
    if alive is not None:
        ok = [o and bool(a) for o, a in zip(ok, alive)]
    return torch.tensor(ok, dtype=torch.bool)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases(), st.booleans())
def test_results_pass_filters_and_never_starve(case, with_deletes):
    catalogue, cfg, trees, filters, k, seed = case
    x = clustered(len(catalogue), 8, seed)
    seg = Segment.build(x, AttributeStore.build(catalogue), config=cfg)
    kinds = schema(catalogue)
    alive = None
    if with_deletes:
        alive = torch.rand(len(seg), generator=torch.Generator().manual_seed(seed)) > 0.3
    q = torch.randn(len(filters), 8, generator=torch.Generator().manual_seed(seed + 1))
    scores, rows, explain = seg.search(q, filters, k, alive=None if alive is None else pack_rows(alive))
    assert sum(e["queries"] for e in explain) == len(filters)
    for i, tree in enumerate(trees):
        ok = passing_rows(seg, catalogue, tree, kinds, alive)
        got = rows[i][rows[i] >= 0]
        assert bool(ok[got].all()), "a returned item fails the filter"
        assert len(got) == min(k, int(ok.sum())), "fewer results than k while more items pass"
        assert len(set(got.tolist())) == len(got)
        assert bool((scores[i][:-1] >= scores[i][1:]).all() | torch.isinf(scores[i][1:]).all())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_full_probe_equals_brute_force_over_stored_vectors(case):
    catalogue, cfg, trees, filters, k, seed = case
    x = clustered(len(catalogue), 8, seed)
    seg = Segment.build(x, AttributeStore.build(catalogue), config=cfg)
    kinds = schema(catalogue)
    q = torch.randn(len(filters), 8, generator=torch.Generator().manual_seed(seed + 1))
    scores, rows, explain = seg.search(q, filters, k, nprobe=seg.nlist)
    assert all(e["plan"] in ("scan", "gather", "none") for e in explain)
    stored = seg.vectors(torch.arange(len(seg)))
    for i, tree in enumerate(trees):
        ok = passing_rows(seg, catalogue, tree, kinds)
        brute = (stored @ q[i]).masked_fill(~ok, float("-inf"))
        want = torch.topk(brute, min(k, len(seg))).values
        want = torch.cat([want, torch.full((k - len(want),), float("-inf"))])
        torch.testing.assert_close(scores[i], want, rtol=1e-5, atol=1e-5)


def test_plans_follow_selectivity():
    n = 8000
    attrs = [{"common": "yes", "rare": "r" if i % 500 == 0 else "no"} for i in range(n)]
    seg = Segment.build(clustered(n, 16, 0), AttributeStore.build(attrs), config=IndexConfig(nlist=32, nprobe=4))
    _, rows, explain = seg.search(torch.randn(3, 16), ["rare:r", "common:yes", None], k=10)
    plans = {e["filter"]: e["plan"] for e in explain}
    assert plans == {"rare:r": "scan", "common:yes": "ivf", None: "ivf"}
    _, _, explain = seg.search(torch.randn(1, 16), ["common:nope"], k=10)
    assert explain[0]["plan"] == "none"
    q = torch.randn(8, 16)  # shared by enough queries: gathered instead of scanned, same result
    scores, gathered, explain = seg.search(q, ["rare:r"] * 8, k=10)
    assert explain[0]["plan"] == "gather"
    scanned = Segment.build(
        clustered(n, 16, 0), AttributeStore.build(attrs), config=IndexConfig(nlist=32, nprobe=4, gather_queries=9)
    ).search(q, ["rare:r"] * 8, k=10)
    assert scanned[2][0]["plan"] == "scan" and torch.equal(gathered, scanned[1])
    torch.testing.assert_close(scores, scanned[0])
    assert (rows >= 0).all()
    assert auto_nlist(1_000_000) == 1024 and auto_nlist(1000) == 1


def test_small_batches_plans_are_cached_and_answer_the_same():
    n = 2000
    attrs = [{"tag": f"t{i % 7}"} for i in range(n)]
    seg = Segment.build(clustered(n, 8, 1), AttributeStore.build(attrs), config=IndexConfig(nlist=16, nprobe=3))
    q, filters = torch.randn(3, 8), ["tag:t1", None, "tag:t1 OR tag:t2"]
    first = seg.search(q, filters, k=12)
    kept = (len(seg._plans), len(seg._programs))
    assert kept[0] == 1 and kept[1] >= 1  # a program per kernel call (a widened query's is its own)
    again = seg.search(q, filters, k=12)  # from the caches
    assert torch.equal(first[1], again[1]) and torch.equal(first[0], again[0]) and first[2] == again[2]
    assert (len(seg._plans), len(seg._programs)) == kept
    seg.search(q, filters, k=5)  # another k: another plan
    kept = (len(seg._plans), len(seg._programs))
    assert kept[0] == 2
    seg.search(torch.randn(17, 8), [f"tag:t{i % 3}" for i in range(17)], k=12)  # many queries: not kept
    assert (len(seg._plans), len(seg._programs)) == kept


def test_recall_on_clustered_data():
    n, d = 20000, 32
    x = torch.nn.functional.normalize(clustered(n, d, 3), dim=1)
    attrs = [{"half": i % 2} for i in range(n)]
    seg = Segment.build(x, AttributeStore.build(attrs), config=IndexConfig(nlist=64, nprobe=16))
    q = x[:50] + 0.05 * torch.randn(50, d)
    _, rows, _ = seg.search(q, ["half:1"] * 50, k=20)
    stored = seg.vectors(torch.arange(n))
    ok = torch.tensor([attrs[int(i)]["half"] == 1 for i in seg.ids])
    truth = torch.topk((q @ stored.T).masked_fill(~ok, float("-inf")), 20).indices
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(rows, truth)) / truth.numel()
    assert recall > 0.9


def test_config_validation():
    with pytest.raises(ValueError, match="nprobe"):
        IndexConfig(nprobe=0)
    with pytest.raises(ValueError, match="scan_selectivity"):
        IndexConfig(scan_selectivity=2.0)
    with pytest.raises(ValueError, match="gather_cost must be >= 0, got -1"):
        IndexConfig(gather_cost=-1)
    with pytest.raises(ValueError, match="gather_fixed must be >= 0, got nan"):
        IndexConfig(gather_fixed=float("nan"))
