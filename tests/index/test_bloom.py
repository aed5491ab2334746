"""BloomIndex: plans (run by ops/plan_program) are supersets of the exact filter for any order and
row subset, exact plans are exact, layout, hashing, snapshots, FPR."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from filter_oracle import catalogues, filter_trees, oracle, render, schema, zipf_catalogue
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.index.attributes import AttributeStore
from sterling.index.bloom import BloomConfig, BloomIndex, term_positions
from sterling.index.bloom_plan import BloomPlan
from sterling.index.filter import FilterError, In, Not, Term, parse
from sterling.ops.plan_program import encode, plan_mask, plan_words

configs = st.builds(
    BloomConfig,
    num_hashes=st.integers(1, 4),
    bits_per_term=st.sampled_from([0.5, 2.0, 10.0]),  # 0.5: a tiny width, collisions everywhere
    width_quantile=st.sampled_from([0.0, 0.5, 1.0]),
    dedicated_bits=st.sampled_from([0, 1, 3, 64]),
    dedicated_min_freq=st.sampled_from([0.0, 0.05, 0.3]),
    numeric_buckets=st.sampled_from([1, 2, 3, 16]),
    seed=st.integers(0, 3),
    min_hashed_width=st.sampled_from([1, 64]),
)


def mask_of(index: BloomIndex, plan: BloomPlan) -> torch.Tensor:
    """bool [N]: the rows that may pass ``plan``, by the kernels' plan interpreter."""
    return plan_mask(index.bits, encode([plan]), 0, torch.arange(len(index)))


@st.composite
def row_subsets(draw: st.DrawFn, n: int) -> torch.Tensor:
    """int64 [M]: up to 5 ranges [start, end) of [0, n) concatenated, possibly empty, overlapping or
    unaligned (the rows of probed clusters)."""
    out = [torch.zeros(0, dtype=torch.int64)]
    for _ in range(draw(st.integers(1, 5))):
        a, b = draw(st.integers(0, n)), draw(st.integers(0, n))
        out.append(torch.arange(min(a, b), max(a, b)))
    return torch.cat(out)


@settings(max_examples=50, deadline=None)
@given(data=st.data(), catalogue=catalogues(max_size=150), config=configs)
def test_mask_is_superset_for_any_order_and_rows(
    data: st.DataObject, catalogue: list[dict], config: BloomConfig
) -> None:
    kinds = schema(catalogue)
    store = AttributeStore.build(catalogue)
    n = len(catalogue)
    order = torch.tensor(data.draw(st.permutations(range(n))), dtype=torch.int64)
    index = BloomIndex.build(store, order, config)
    if not kinds:
        return
    for _ in range(4):
        tree = data.draw(filter_trees(kinds))
        exact = torch.tensor([oracle(tree, catalogue[i], kinds) for i in order.tolist()], dtype=torch.bool)
        plan = index.compile(tree)
        mask = mask_of(index, plan)  # in index row order
        assert mask.shape == (n,)
        assert not bool((exact & ~mask).any()), f"dropped a passing item: {tree}"
        if plan.exact:
            assert torch.equal(mask, exact), tree
        if plan.constant is not None:
            assert bool(mask.all()) if plan.constant else not bool(mask.any())
        text = render(tree, data.draw(st.randoms(use_true_random=False)))
        assert index.compile(text) == plan
        assert torch.equal(index.candidates(plan), torch.nonzero(mask).squeeze(1))

        rows = data.draw(row_subsets(n))
        assert torch.equal(plan_mask(index.bits, encode([plan]), 0, rows), mask[rows])


def test_naive_not_would_drop_items_but_plan_does_not() -> None:
    # A one-bit hashed region: every hashed term collides with every other, so a plain
    # "NOT of the Bloom test" would drop every item; the plan keeps them (unknown = all ones).
    catalogue = [{"tag": [f"t{i}"]} for i in range(10)] + [{"tag": ["rare"]}]
    config = BloomConfig(num_hashes=1, bits_per_term=1.0, dedicated_bits=0, width_quantile=0.0, min_hashed_width=1)
    index = BloomIndex.build(AttributeStore.build(catalogue), config=config)
    assert index.layout()["hashed"] == 1
    positive = index.compile("tag:rare")
    assert mask_of(index, positive).all() and not positive.exact  # every item collides
    negated = index.compile("NOT tag:rare")
    assert mask_of(index, negated).all() and not negated.exact
    assert index.compile("NOT tag:rare AND NOT tag:t0").constant is True
    assert index.compile("tag:zzz").constant is False  # an unknown value: exactly empty
    assert index.compile("NOT tag:zzz").exact


def test_dedicated_bits_and_numeric_buckets_are_exact() -> None:
    catalogue = [
        {"genre": ["Drama", "War"], "year": 1995, "lang": "en"},
        {"genre": ["Drama"], "year": 1980, "lang": "en"},
        {"genre": ["Comedy"], "lang": "fr"},  # no year
        {"year": 1990, "lang": "de"},
    ] * 8
    store = AttributeStore.build(catalogue)
    index = BloomIndex.build(store, config=BloomConfig(dedicated_min_freq=0.0))
    for text in [
        "NOT genre:Drama",
        "genre IN (War, Comedy) AND NOT lang IN (en, de)",
        "NOT year >= 1990",  # keeps the items without a year
        "NOT (year > 1980 AND year != 1995) OR lang:fr",
        "year IN (1980, 1990) OR NOT year = 1995",
        "year:1990 AND NOT genre:zzz",
    ]:
        plan = index.compile(text)
        assert plan.exact, text
        assert torch.equal(mask_of(index, plan), store.evaluate_filter(text)), text


def test_numeric_buckets_straddle_boundaries_as_supersets() -> None:
    catalogue = [{"year": 1950 + i % 70} for i in range(700)] + [{}] * 50
    store = AttributeStore.build(catalogue)
    index = BloomIndex.build(store, config=BloomConfig(numeric_buckets=4))
    assert index.layout()["numeric"] == 4
    for text in ["year >= 1991", "NOT year >= 1991", "year:1990", "NOT year != 1990",
                 "year < 1950", "NOT year < 2100", "year IN (1950, 2019)"]:  # fmt: skip
        plan = index.compile(text)
        mask, exact = mask_of(index, plan), store.evaluate_filter(text)
        assert not bool((exact & ~mask).any()), text
        assert int(mask.sum()) <= int(exact.sum()) + 750 // 4 * 2 + 1, text
    assert mask_of(index, index.compile("NOT year >= 1991"))[700:].all()  # missing years kept
    assert index.compile("year < 1950").constant is False
    assert index.compile("NOT year < 2100").exact  # exactly the items without a year


def test_bits_layout_is_transposed_in_row_order() -> None:
    # With every value dedicated, bit row b unpacked over the items is the exact mask of b's term.
    catalogue = zipf_catalogue(300, seed=1)
    store = AttributeStore.build(catalogue)
    order = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    config = BloomConfig(dedicated_bits=10_000, dedicated_min_freq=0.0)
    index = BloomIndex.build(store, order, config)
    assert index.layout()["hashed"] == 0
    unpacked = ((index.bits.unsqueeze(-1) >> torch.arange(64)) & 1).bool().flatten(1)[:, :300]
    for name in ("genre", "language", "tags"):
        for value in store.columns[name].vocab[:20]:
            plan = index.compile(Term(name, value))
            assert plan.exact and len(plan.rows) == 1
            assert torch.equal(unpacked[plan.rows[0]], store.evaluate(Term(name, value))[order])
            assert torch.equal(plan_words(index.bits, encode([plan]), 0), index.bits[plan.rows[0]])


def test_hash_is_stable_across_processes() -> None:
    # Pinned values (splitmix64 double hashing), checked against a plain-Python splitmix64 too.
    assert term_positions(3, torch.tensor([0, 7, 2**31]), 1000, 4, 0).tolist() == [
        [106, 241, 760, 895],
        [933, 778, 623, 852],
        [52, 407, 762, 501],
    ]
    mask = (1 << 64) - 1

    def splitmix(x: int) -> int:
        z = (x + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    for feature, vid, width, seed in [(0, 1, 64, 5), (9, 123456, 997, 0), (2, 0, 3, 1)]:
        h1 = splitmix(((feature << 32) | vid) ^ splitmix(seed))
        h2 = splitmix(h1) | 1
        expected = [((h1 + j * h2) & mask) % width for j in range(5)]
        assert term_positions(feature, torch.tensor([vid]), width, 5, seed)[0].tolist() == expected


def test_errors_match_the_attribute_store() -> None:
    store = AttributeStore.build([{"genre": "Drama", "year": 1995}])
    index = BloomIndex.build(store)
    for text in ["genre:Drama AND colour:red", "genre > 3", "year IN (1, 2) OR NOT x:1"]:
        with pytest.raises(FilterError) as bloom_error:
            index.compile(text)
        with pytest.raises(FilterError) as store_error:
            store.evaluate_filter(text)
        assert str(bloom_error.value) == str(store_error.value)
    with pytest.raises(FilterError, match="position 6"):
        index.compile("genre:")
    with pytest.raises(ValueError, match="permutation"):
        BloomIndex.build(store, torch.tensor([1]))
    with pytest.raises(ValueError, match="num_hashes"):
        BloomConfig(num_hashes=0)


def test_empty_catalogue_and_items_without_attributes() -> None:
    empty = BloomIndex.build(AttributeStore.build([{"g": "a", "y": 1}]).take(torch.zeros(0)))
    for text in ["NOT g IN (a, b)", "g:a", "y >= 1", "NOT y >= 1"]:
        assert mask_of(empty, empty.compile(text)).shape == (0,)
        assert empty.candidates(empty.compile(text)).shape == (0,)
    assert plan_words(empty.bits, encode([empty.compile(Not(In("g", ("a",))))]), 0).shape == (0,)
    with pytest.raises(FilterError, match="unknown feature 'x'"):
        BloomIndex.build(AttributeStore.build([])).compile("x:1")
    store = AttributeStore.build([{}, {"g": "a"}, {}])
    index = BloomIndex.build(store)
    plan = index.compile("NOT g:a")
    assert mask_of(index, plan).tolist() == [True, False, True]
    assert index.candidates(plan).tolist() == [0, 2]  # the padding bits of the word never count
    assert index.candidates(index.compile("NOT g:zzz")).tolist() == [0, 1, 2]


@settings(max_examples=15, deadline=None)
@given(data=st.data(), catalogue=catalogues(max_size=100), config=configs)
def test_snapshot_round_trip(data: st.DataObject, catalogue: list[dict], config: BloomConfig) -> None:
    store = AttributeStore.build(catalogue)
    index = BloomIndex.build(store, config=config)
    meta = json.loads(json.dumps(index.meta()))
    loaded = BloomIndex.from_parts(meta, index.to_tensors())
    assert loaded.meta() == index.meta() and loaded.nbytes() == index.nbytes()
    kinds = schema(catalogue)
    for _ in range(3 if kinds else 0):
        tree = data.draw(filter_trees(kinds))
        plan = index.compile(tree)
        assert loaded.compile(tree) == plan
        assert torch.equal(loaded.candidates(plan), index.candidates(plan))


def test_from_parts_rejects_inconsistent_parts() -> None:
    index = BloomIndex.build(AttributeStore.build(zipf_catalogue(200)))
    meta, tensors = index.meta(), index.to_tensors()
    with pytest.raises(ValueError, match="bits"):
        BloomIndex.from_parts(meta, {**tensors, "bits": tensors["bits"][:, :-1]})
    with pytest.raises(ValueError, match="term bits"):
        BloomIndex.from_parts(meta, {**tensors, "term_bits": tensors["term_bits"][:-1]})
    with pytest.raises(ValueError, match="malformed"):
        BloomIndex.from_parts({k: v for k, v in meta.items() if k != "features"}, tensors)
    with pytest.raises(ValueError, match="format"):
        BloomIndex.from_parts({**meta, "format": 99}, tensors)


def test_realistic_catalogue_false_positive_rate_and_memory() -> None:
    n = 20_000
    store = AttributeStore.build(zipf_catalogue(n, seed=0))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    index = BloomIndex.build(store, order)
    layout = index.layout()
    assert index.bytes_per_item() == layout["total"] * math.ceil(n / 64) * 8 / n
    assert layout["total"] / 8 <= index.bytes_per_item() < layout["total"] / 8 * 1.01
    assert index.bytes_per_item() <= 28  # documented sizing: D (<= 128) + buckets + M bits
    rates, exact_terms = [], 0
    rank = torch.argsort(order).numpy()  # store item -> index row
    for name, step in (("genre", 1), ("language", 1), ("country", 2), ("tags", 20)):
        column = store.columns[name]
        entry_rows, value_ids = (t.numpy() for t in column.entries())
        for vid in range(0, len(column.vocab), step):  # a sample keeps this test short
            exact = np.zeros(n, dtype=bool)  # the term's exact mask, in index row order
            exact[rank[entry_rows[value_ids == vid]]] = True
            plan = index.compile(Term(name, column.vocab[vid]))
            mask = mask_of(index, plan).numpy()
            assert not (exact & ~mask).any()
            if plan.exact:
                exact_terms += 1
                assert (mask == exact).all()
            else:
                rates.append((mask & ~exact).sum() / (~exact).sum())
    rates_t = torch.tensor(rates)
    mean_fpr, p99_fpr = float(rates_t.mean()), float(rates_t.quantile(0.99))
    print(
        f"\nBloom on {n} zipf items: layout {layout}, {index.bytes_per_item():.2f} bytes/item; "
        f"{exact_terms} exact terms, {len(rates)} hashed: FPR mean {mean_fpr:.4%}, "
        f"p99 {p99_fpr:.4%}, max {float(rates_t.max()):.4%}"
    )
    assert exact_terms >= 30 and mean_fpr < 0.01 and p99_fpr < 0.03
    for text in ["NOT language:l0", "NOT genre IN (g0, g1)", "language IN (l0, l1, l2)"]:
        assert index.compile(parse(text)).exact, text


def test_module_docstring_example() -> None:
    store = AttributeStore.build([{"genre": ["Drama"], "year": 1995}, {"year": 1980}, {}])
    index = BloomIndex.build(store)
    plan = index.compile("NOT year >= 1990")
    assert plan.exact
    assert index.candidates(plan).tolist() == [1, 2]
