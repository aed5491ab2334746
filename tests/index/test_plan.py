"""Plan on the host, execute as tensors: ItemIndex.plan + masked_ivf_topk return what search returns."""

from __future__ import annotations

import random

import pytest
import torch
from filter_oracle import filter_trees, oracle, render, schema, zipf_catalogue
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sterling import IndexConfig, ItemIndex
from sterling.index.filter import FilterError, Term
from sterling.ops.reference.masked_ivf_topk import masked_ivf_topk

NEVER = "language:zzz"  # a value no item holds: the Bloom plan is constant false


def clustered(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, d, generator=gen)
    return centres[torch.randint(6, (n,), generator=gen)] + 0.3 * torch.randn(n, d, generator=gen)


def execute(index: ItemIndex, queries: torch.Tensor, k: int, filters, nprobe) -> tuple[torch.Tensor, torch.Tensor]:
    """scores, ids of the planned, tensor-only search."""
    plan = index.plan(k, filters, nprobe, batch=len(queries))
    tensors = index.executor_tensors()
    ids = tensors.pop("ids")
    scores, rows = masked_ivf_topk(queries, **tensors, probes=plan.probes, allowed=plan.allowed, k=k)
    return scores, torch.where(rows >= 0, ids[rows.clamp(min=0)], -1) if len(ids) else rows


def assert_same_up_to_ties(index: ItemIndex, queries, scores, ids, want_scores, want_ids) -> int:
    """Equal ids and allclose scores, except that two items whose scores agree within 1e-5 may
    trade places (or, at the last result, one may stand for the other): where the ids differ,
    the scores at that rank agree and the executor's item scores so from its stored vector.
    Returns the number of such ties."""
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids >= 0, want_ids >= 0)
    differ = torch.nonzero(ids != want_ids).tolist()
    for b, j in differ:
        stored = index.embeddings_of([int(ids[b, j])])[0]
        torch.testing.assert_close(float(stored @ queries[b]), float(want_scores[b, j]), rtol=1e-5, atol=1e-5)
    for b in range(len(ids)):
        got = ids[b][ids[b] >= 0].tolist()
        assert len(set(got)) == len(got)
    return len(differ)


@st.composite
def cases(draw):
    n = draw(st.one_of(st.integers(0, 40), st.integers(200, 2000)))
    catalogue = zipf_catalogue(n, seed=draw(st.integers(0, 2**16)))
    nlist = draw(st.integers(1, 32))
    config = IndexConfig(
        nlist=nlist,
        nprobe=draw(st.integers(1, 4)),
        scan_selectivity=draw(st.sampled_from([0.0, 0.002, 0.05])),
        min_candidates=draw(st.sampled_from([0.0, 0.0, 16.0])),
        gather_queries=draw(st.sampled_from([2, 3, 64])),
        gather_cost=draw(st.sampled_from([0.0, 6.0])),
        gather_fixed=draw(st.sampled_from([0.0, 6.0])),
        sample_size=draw(st.sampled_from([64, 16384])),
        kernel=draw(st.sampled_from(["cpu", "reference"])),
    )
    seed = draw(st.integers(0, 2**16))
    index = ItemIndex.build(clustered(n, draw(st.integers(1, 16)), seed), catalogue, config=config)
    kinds = schema(catalogue)
    b = draw(st.integers(1, 10))
    rnd = random.Random(seed)
    trees = {None: None}  # filter text -> tree, for the oracle
    if n:
        trees[NEVER] = Term("language", "zzz")
        trees.update((render(tree, rnd), tree) for tree in (draw(filter_trees(kinds, max_leaves=3)) for _ in range(3)))
    pool = list(trees)
    filters = [draw(st.sampled_from(pool)) for _ in range(b)]
    if b >= 3 and draw(st.booleans()):  # one filter shared by several queries: the gather plan
        shared = draw(st.sampled_from(pool))
        filters = [shared if draw(st.booleans()) or i < 3 else f for i, f in enumerate(filters)]
    dead = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: draw(st.integers(0, n // 3))]
    index.delete(dead)
    nprobe = draw(st.sampled_from([None, max(1, nlist - 1), nlist, 1 << 20, draw(st.integers(1, 40))]))
    queries = torch.randn(b, index.dim, generator=torch.Generator().manual_seed(seed + 1))
    k = draw(st.one_of(st.integers(1, 30), st.integers(1, n + 5)))
    return index, catalogue, kinds, trees, queries, filters, k, nprobe


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_planned_execution_equals_search(case):
    index, catalogue, kinds, trees, queries, filters, k, nprobe = case
    want = index.search(queries, k, filters, nprobe, explain=True)
    scores, ids = execute(index, queries, k, filters, nprobe)
    ties = assert_same_up_to_ties(index, queries, scores, ids, want.scores, want.ids)
    event(f"ties: {ties > 0}")
    for record in want.explain:
        event(f"plan {record['plan']}, widened: {record['widened_queries'] > 0}")

    # the probes are the planner's own (explain), a gathered filter reading as a scan of all lists
    plan = index.plan(k, filters, nprobe, batch=len(queries))
    nlist = len(index.executor_tensors()["centroids"])
    first = {r["filter"]: nlist if r["plan"] == "gather" else r["nprobe"] for r in want.explain}
    assert plan.probes.tolist() == [first[f] for f in filters]
    assert plan.probes.dtype == torch.int64 and plan.allowed.dtype == torch.int64

    # the allowed rows are the exact filter (the plain oracle over the attribute dicts) and alive
    row_ids = index.executor_tensors()["ids"].tolist()
    live = set(index.ids.tolist())
    assert plan.allowed.shape == (len(filters), (len(row_ids) + 63) // 64)
    for expr in dict.fromkeys(filters):
        tree = trees[expr]
        passes = [i in live and (tree is None or oracle(tree, catalogue[i], kinds)) for i in row_ids]
        words = plan.allowed[filters.index(expr)].tolist()
        bits = [bool((words[r // 64] >> (r % 64)) & 1) for r in range(len(row_ids))]
        assert bits == passes, expr
        assert (expr != NEVER) or plan.probes[filters.index(expr)] == 0


def test_gather_scan_ivf_and_none_plans_all_match():
    n = 4000
    attrs = [{"common": "yes", "rare": "r" if i % 400 == 0 else "no", "year": 1990 + i % 30} for i in range(n)]
    config = IndexConfig(nlist=64, nprobe=2, min_candidates=0, kernel="cpu", gather_fixed=0.0)
    index = ItemIndex.build(clustered(n, 16, 0), attrs, config=config)
    index.delete(torch.arange(0, n, 7))
    queries = torch.randn(13, 16, generator=torch.Generator().manual_seed(0))
    filters = ["rare:r"] * 8 + ["common:yes", None, "rare:nope", "year >= 2018", "rare:r AND year < 1995"]
    seen = set()
    for k in (1, 10, 200, n + 3):
        want = index.search(queries, k, filters, explain=True)
        scores, ids = execute(index, queries, k, filters, None)
        assert_same_up_to_ties(index, queries, scores, ids, want.scores, want.ids)
        plans = {r["filter"]: r["plan"] for r in want.explain}
        assert plans["rare:r"] == "gather" and plans["rare:nope"] == "none"
        seen |= set(plans.values()) | {"widened" for r in want.explain if r["widened_queries"]}
    assert seen == {"gather", "scan", "ivf", "none", "widened"}


def test_fresh_items_must_be_compacted():
    index = ItemIndex.build(torch.randn(50, 4), [{"a": i % 2} for i in range(50)], config=IndexConfig(nlist=4))
    index.upsert([100], torch.randn(1, 4), [{"a": 1}])
    with pytest.raises(ValueError, match=r"1 fresh items.*compact\(\) first"):
        index.plan(5, "a:1")
    index.compact()
    queries = torch.randn(3, 4)
    scores, ids = execute(index, queries, 5, "a:1", None)
    want = index.search(queries, 5, "a:1")
    assert_same_up_to_ties(index, queries, scores, ids, want.scores, want.ids)
    assert index.plan(5, "a:1").probes.shape == (1,) and index.plan(5, ["a:1", None]).allowed.shape == (2, 1)


def small_index() -> ItemIndex:
    return ItemIndex.build(torch.randn(20, 2), [{"genre": ["War"], "year": 1990 + i} for i in range(20)])


@pytest.mark.parametrize(
    "k, filter, nprobe",
    [
        (0, None, None),
        (True, None, None),
        (2.0, None, None),
        (2, None, 0),
        (2, None, True),
        (2, None, 1.5),
        (2, ["year:1"], None),
        (2, ["year:1", 3], None),
        (2, 5, None),
        (2, ["year:1", "genre:"], None),
        (2, ["year:1", "colour:red"], None),
        (2, "genre < 3", None),
        (2, ["genre:Drama year:1995", None], None),
    ],
)
def test_plan_raises_what_search_raises(k, filter, nprobe):
    index = small_index()
    with pytest.raises((ValueError, FilterError)) as searched:
        index.search(torch.randn(2, 2), k, filter, nprobe)
    with pytest.raises(type(searched.value)) as planned:
        index.plan(k, filter, nprobe, batch=2)
    assert str(planned.value) == str(searched.value)


def test_plan_batch():
    index = small_index()
    assert index.plan(3, ["year:1991", None, "year:1991"]).allowed.shape == (3, 1)
    assert index.plan(3, "year:1991", batch=4).probes.shape == (4,)
    assert index.plan(3, None, batch=0).allowed.shape == (0, 1)
    for bad in (-1, True, 1.0):
        with pytest.raises(ValueError, match="batch must be None or an int >= 0"):
            index.plan(3, batch=bad)
