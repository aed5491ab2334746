"""ItemIndex: filtered search against a brute-force oracle, updates, concurrency and snapshots."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from filter_oracle import catalogues, filter_trees, item_attributes, oracle, render, schema
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling import IndexConfig, ItemIndex, SearchResult
from sterling.index.bloom import BloomIndex
from sterling.index.filter import FilterError
from sterling.ops.reference.masked_ivf_topk import masked_ivf_topk
from sterling.snapshot import SnapshotError, write_snapshot


def brute_force_check(
    res: SearchResult,
    queries: torch.Tensor,
    k: int,
    items: dict[int, tuple[torch.Tensor, dict]],
    passes: list,
    exact: bool = True,
) -> None:
    """``passes[b](attributes) -> bool`` per query; ``items``: id -> (embedding, attributes).
    Checks count, padding, that every id passes, exact scores, order, and (``exact``) that no
    passing item left out scores above the last one returned (ties aside)."""
    assert res.ids.shape == res.scores.shape == (len(queries), k)
    assert res.ids.dtype == torch.int64 and res.scores.dtype == torch.float32
    for b, query in enumerate(queries):
        scores = {i: float(emb.double() @ query.double()) for i, (emb, attrs) in items.items() if passes[b](attrs)}
        count = min(k, len(scores))
        got = res.ids[b, :count].tolist()
        assert (res.ids[b, count:] == -1).all() and torch.isneginf(res.scores[b, count:]).all()
        assert len(set(got)) == count and all(i in scores for i in got)
        torch.testing.assert_close(
            res.scores[b, :count].double(),
            torch.tensor([scores[i] for i in got], dtype=torch.float64),
            rtol=1e-5,
            atol=1e-4,
        )
        assert (res.scores[b, :count].diff() <= 0).all()
        rest = [s for i, s in scores.items() if i not in set(got)]
        if exact and count and rest:
            assert max(rest) <= min(scores[i] for i in got) + 1e-4


@st.composite
def indexes(draw: st.DrawFn, anchored: bool = False):
    catalogue = draw(catalogues(anchored=anchored))
    n, d = len(catalogue), draw(st.integers(1, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    embeddings = torch.randn(n, d, generator=gen)
    ids = torch.randperm(4 * n + 1, generator=gen)[:n] - n  # unique, some negative
    ids = torch.where(ids == -1, 3 * n + 1, ids)  # -1 marks an empty result slot; 3n + 1 is never drawn
    config = IndexConfig(
        nlist=draw(st.integers(1, 4)),
        nprobe=draw(st.integers(1, 4)),
        kernel=draw(st.sampled_from(["cpu", "reference"])),
        compact_at=draw(st.sampled_from([4, 65536])),
    )
    return catalogue, embeddings, ids, config, gen


def exact_search(index: ItemIndex, queries: torch.Tensor, k: int, filter) -> SearchResult:
    """Search probing every list: the exact filtered top-k over the stored vectors."""
    return index.search(queries, k=k, filter=filter, nprobe=1 << 20)


def stored(index: ItemIndex, catalogue: dict[int, dict]) -> dict[int, tuple[torch.Tensor, dict]]:
    """id -> (the index's stored vector, attributes): the brute-force oracle's items."""
    ids = list(catalogue)
    return dict(zip(ids, zip(index.embeddings_of(ids) if ids else [], catalogue.values())))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), index=indexes())
def test_filtered_search_matches_brute_force(data: st.DataObject, index: tuple) -> None:
    catalogue, embeddings, ids, config, gen = index
    built = ItemIndex.build(embeddings, catalogue, ids=ids, config=config)
    kinds = schema(catalogue)
    b = data.draw(st.integers(1, 4))
    queries = torch.randn(b, embeddings.shape[1], generator=gen)
    k = data.draw(st.integers(1, len(catalogue) + 5))
    trees = [data.draw(st.one_of(st.none(), filter_trees(kinds))) if kinds else None for _ in range(b)]
    rnd = data.draw(st.randoms(use_true_random=False))
    texts = [None if t is None else render(t, rnd) for t in trees]
    if data.draw(st.booleans()):  # one filter for the batch
        texts, trees = texts[0], [trees[0]] * b
    elif b > 1 and data.draw(st.booleans()):  # repeated filters in one batch
        texts[-1], trees[-1] = texts[0], trees[0]
    items = stored(built, {int(i): catalogue[r] for r, i in enumerate(ids)})
    passes = [(lambda a: True) if t is None else (lambda a, t=t: oracle(t, a, kinds)) for t in trees]
    brute_force_check(exact_search(built, queries, k, texts), queries, k, items, passes)
    brute_force_check(built.search(queries, k=k, filter=texts), queries, k, items, passes, exact=False)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), index=indexes())
def test_excluded_ids_are_part_of_the_filter(data: st.DataObject, index: tuple) -> None:
    """Per-query excluded ids never come back and the rest is the exact filtered top-k without
    them (so k come back while k pass), with fresh rows too; the tensor-only plan agrees."""
    catalogue, embeddings, ids, config, gen = index
    built = ItemIndex.build(embeddings, catalogue, ids=ids, config=config)
    kinds = schema(catalogue)
    b = data.draw(st.integers(1, 3))
    queries = torch.randn(b, embeddings.shape[1], generator=gen)
    k = data.draw(st.integers(1, len(catalogue) + 2))
    tree = data.draw(st.one_of(st.none(), filter_trees(kinds))) if kinds else None
    text = None if tree is None else render(tree, data.draw(st.randoms(use_true_random=False)))
    pool = ids.tolist() + [10**9]  # an unknown id is ignored
    exclude = [data.draw(st.lists(st.sampled_from(pool), max_size=len(pool))) for _ in range(b)]
    plan = built.plan(k, text, nprobe=1 << 20, batch=b, exclude=exclude)
    if len(ids) and data.draw(st.booleans()):  # a fresh row, excluded in query 0
        new = int(ids.max()) + 1
        built.upsert([new], torch.randn(1, embeddings.shape[1], generator=gen), [catalogue[0]])
        catalogue = {**{int(i): catalogue[r] for r, i in enumerate(ids)}, new: catalogue[0]}
        exclude[0] = [*exclude[0], new]
    else:
        catalogue = {int(i): catalogue[r] for r, i in enumerate(ids)}
    items = stored(built, catalogue)
    passes = [
        (lambda a, i, q=q: i not in set(exclude[q]))
        if tree is None
        else (lambda a, i, q=q: i not in set(exclude[q]) and oracle(tree, a, kinds))
        for q in range(b)
    ]
    res = built.search(queries, k=k, filter=text, nprobe=1 << 20, exclude=exclude)
    keyed = {i: (e, (i, a)) for i, (e, a) in items.items()}
    brute_force_check(res, queries, k, keyed, [lambda ia, q=q: passes[q](ia[1], ia[0]) for q in range(b)])
    if len(ids) and len(catalogue) == len(ids):  # the executor covers a non-empty main segment only
        tensors = built.executor_tensors()
        row_ids = tensors.pop("ids")
        _, rows = masked_ivf_topk(queries, **tensors, probes=plan.probes, allowed=plan.allowed, k=k)
        got = torch.where(rows >= 0, row_ids[rows.clamp(min=0)], -1)
        assert got.tolist() == res.ids.tolist()


@settings(max_examples=30, deadline=None)
@given(data=st.data(), index=indexes(anchored=True))
def test_updates_equal_fresh_build(data: st.DataObject, index: tuple) -> None:
    catalogue, embeddings, ids, config, gen = index
    d = embeddings.shape[1]
    live = ItemIndex.build(embeddings, catalogue, ids=ids, config=config)
    model = {int(i): (embeddings[r], catalogue[r]) for r, i in enumerate(ids)}
    anchors = {int(ids[0]), int(ids[1])}  # never touched: features keep their kinds
    for _ in range(data.draw(st.integers(1, 4))):
        pool = st.integers(-len(model) - 5, 4 * len(model) + 5).filter(lambda i: i not in anchors and i != -1)
        if data.draw(st.booleans()):
            new_ids = data.draw(st.lists(pool, unique=True, max_size=10))
            attrs = [data.draw(item_attributes()) for _ in new_ids]
            embs = torch.randn(len(new_ids), d, generator=gen)
            live.upsert(torch.tensor(new_ids, dtype=torch.int64), embs, attrs)
            model.update({i: (embs[j], attrs[j]) for j, i in enumerate(new_ids)})
            if data.draw(st.booleans()):
                live.compact()
        else:
            gone = data.draw(st.lists(pool, max_size=10))
            assert live.delete(gone) == len(set(gone) & set(model))
            for i in gone:
                model.pop(i, None)
    fresh_ids = list(model)
    fresh = ItemIndex.build(
        torch.stack([model[i][0] for i in fresh_ids]),
        [model[i][1] for i in fresh_ids],
        ids=fresh_ids,
        config=config,
    )
    assert len(live) == len(fresh) == len(model)
    assert sorted(live.ids.tolist()) == sorted(fresh_ids)
    assert live.attributes_of(fresh_ids) == fresh.attributes_of(fresh_ids)
    assert torch.equal(live.embeddings_of(fresh_ids), fresh.embeddings_of(fresh_ids))
    kinds = schema([a for _, a in model.values()])
    queries = torch.randn(3, d, generator=gen)
    for _ in range(3):
        tree = data.draw(filter_trees(kinds))
        text = render(tree, random.Random(0))
        k = data.draw(st.integers(1, len(model) + 3))
        got, want = exact_search(live, queries, k, text), exact_search(fresh, queries, k, text)
        for b in range(3):
            assert set(got.ids[b].tolist()) == set(want.ids[b].tolist())
        torch.testing.assert_close(got.scores, want.scores)
        items = stored(live, {i: a for i, (_, a) in model.items()})
        brute_force_check(got, queries, k, items, [lambda a, t=tree: oracle(t, a, kinds)] * 3)
        brute_force_check(
            live.search(queries, k=k, filter=text),
            queries,
            k,
            items,
            [lambda a, t=tree: oracle(t, a, kinds)] * 3,
            exact=False,
        )


def small_index(**kwargs) -> ItemIndex:
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    attrs = [
        {"genre": ["Drama", "War"], "year": 1995},
        {"genre": "Comedy", "year": 2001},
        {"genre": "(no genres listed)"},
        {"year": 1980, "lang": "en"},
    ]
    return ItemIndex.build(emb, attrs, ids=[10, 11, 12, 13], **kwargs)


def test_small_example() -> None:
    index = small_index()
    res = index.search(torch.tensor([1.0, 0.5]), k=3, filter="NOT genre:Comedy AND (year >= 1990 OR lang:en)")
    assert res.ids.tolist() == [[10, 13, -1]]
    assert res.scores[0, :2].tolist() == [1.0, -1.0] and res.scores[0, 2] == float("-inf")
    res = index.search(torch.tensor([[1.0, 0.5], [0.1, 1.0]]), k=2, filter=['genre:"(no genres listed)"', None])
    assert res.ids.tolist() == [[12, -1], [12, 11]]
    assert index.search(torch.tensor([1.0, 0.5]), k=2, filter="genre:Horror").ids.tolist() == [[-1, -1]]
    assert index.search(torch.tensor([1.0, 0.5]), k=1, nprobe=4).ids.tolist() == [[12]]
    assert len(index) == 4 and index.dim == 2 and index.ids.tolist() == [10, 11, 12, 13]
    assert index.attributes_of([13, 11]) == [
        {"year": 1980, "lang": "en"},
        {"genre": ["Comedy"], "year": 2001},
    ]


def test_numpy_inputs_and_copies() -> None:
    emb = np.random.default_rng(0).normal(size=(5, 3))
    index = ItemIndex.build(emb, [{}] * 5, ids=np.arange(5, 10))
    before = index.search(np.ones(3), k=5)
    emb[:] = 0.0  # the index holds its own copy
    after = index.search(np.ones(3, dtype=np.float32), k=5)
    assert torch.equal(before.ids, after.ids) and torch.equal(before.scores, after.scores)
    index.ids[0] = 99
    assert index.ids[0] == 5


def test_identical_filters_compiled_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    original = BloomIndex.compile
    monkeypatch.setattr(BloomIndex, "compile", lambda self, node, e=None: calls.append(e) or original(self, node, e))
    index = small_index()
    for _ in range(2):
        index.search(torch.randn(5, 2), k=2, filter=["year > 1", "genre:War", "year > 1", None, "genre:War"])
    assert sorted(calls) == ["genre:War", "year > 1"]


def test_upsert_replaces_and_appends() -> None:
    index = small_index()
    index.upsert([11, 20], torch.tensor([[5.0, 5.0], [0.0, 2.0]]), [{"genre": "Noir"}, {"year": 1999}])
    assert len(index) == 5
    assert index.attributes_of([11, 20]) == [{"genre": ["Noir"]}, {"year": 1999}]
    assert index.search(torch.tensor([1.0, 1.0]), k=1, filter="genre:Noir").ids.tolist() == [[11]]
    assert index.search(torch.tensor([1.0, 1.0]), k=5, filter="genre:Comedy").ids.tolist() == [[-1] * 5]
    assert index.delete([11, 11, 12, 999]) == 2
    assert sorted(index.ids.tolist()) == [10, 13, 20]
    assert index.delete([999]) == 0
    assert index.delete(index.ids) == 3 and len(index) == 0
    assert index.search(torch.ones(2), k=2).ids.tolist() == [[-1, -1]]
    index.upsert([1], torch.ones(1, 2), [{"year": 3}])
    assert index.search(torch.ones(2), k=2, filter="year = 3").ids.tolist() == [[1, -1]]


def test_failed_upsert_leaves_index_unchanged() -> None:
    index = small_index()
    with pytest.raises(ValueError, match="item 1: unknown feature 'colour'"):
        index.upsert([10, 30], torch.ones(2, 2), [{"year": 1}, {"colour": "red"}])
    with pytest.raises(ValueError, match="feature 'year': the feature is numeric, got list"):
        index.upsert([10], torch.ones(1, 2), [{"year": [1]}])
    assert index.ids.tolist() == [10, 11, 12, 13]
    assert index.attributes_of([10]) == [{"genre": ["Drama", "War"], "year": 1995}]


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: ItemIndex.build(torch.randn(3), [{}] * 3),
            ValueError,
            r"embeddings must have shape \[N, D\]",
        ),
        (lambda: ItemIndex.build(torch.randn(3, 0), [{}] * 3), ValueError, "with D >= 1"),
        (
            lambda: ItemIndex.build(torch.ones(3, 2, dtype=torch.int64), [{}] * 3),
            ValueError,
            "embeddings must be floating point, got torch.int64",
        ),
        (
            lambda: ItemIndex.build(torch.tensor([[1.0], [float("nan")]]), [{}] * 2),
            ValueError,
            r"embeddings contain NaN or inf \(row 1\)",
        ),
        (lambda: ItemIndex.build(torch.tensor([[float("inf")]]), [{}]), ValueError, "NaN or inf"),
        (
            lambda: ItemIndex.build(torch.randn(3, 2), [{}] * 2),
            ValueError,
            "got 2 attribute dicts for 3 embeddings",
        ),
        (
            lambda: ItemIndex.build(torch.randn(3, 2), {"a": 1}),
            ValueError,
            "attributes must be a list of 3 dicts, got dict",
        ),
        (
            lambda: ItemIndex.build(torch.randn(2, 2), [{}] * 2, ids=[4, 4]),
            ValueError,
            "ids must be unique; id 4 appears more than once",
        ),
        (
            lambda: ItemIndex.build(torch.randn(2, 2), [{}] * 2, ids=[1.0, 2.0]),
            ValueError,
            "ids must be integers, got torch.float32",
        ),
        (
            lambda: ItemIndex.build(torch.randn(2, 2), [{}] * 2, ids=[1, 2, 3]),
            ValueError,
            "got 3 ids for 2 embeddings",
        ),
        (
            lambda: ItemIndex.build(torch.randn(2, 2), [{}] * 2, ids=[[1, 2]]),
            ValueError,
            r"ids must have shape \[M\]",
        ),
        (lambda: IndexConfig(nprobe=0), ValueError, "nprobe must be an int >= 1, got 0"),
        (
            lambda: small_index().search(torch.randn(3), k=1),
            ValueError,
            "queries have dimension 3, the index has 2",
        ),
        (
            lambda: small_index().search(torch.randn(2, 2, 2), k=1),
            ValueError,
            r"queries must have shape \[B, D\] or \[D\]",
        ),
        (
            lambda: small_index().search(torch.tensor([1.0, float("nan")])),
            ValueError,
            "queries contain NaN or inf",
        ),
        (
            lambda: small_index().search(torch.tensor([1, 2])),
            ValueError,
            "queries must be floating point",
        ),
        (
            lambda: small_index().search(torch.randn(2), k=0),
            ValueError,
            "k must be an int >= 1, got 0",
        ),
        (
            lambda: small_index().search(torch.randn(2), k=True),
            ValueError,
            "k must be an int >= 1, got True",
        ),
        (
            lambda: small_index().search(torch.randn(2), nprobe=0),
            ValueError,
            "nprobe must be None or an int >= 1",
        ),
        (
            lambda: small_index().search(torch.randn(2, 2), filter=["year:1"]),
            ValueError,
            "a list of 2 str .one per query., got 1 filters",
        ),
        (
            lambda: small_index().search(torch.randn(2, 2), filter=["year:1", 3]),
            ValueError,
            "filter 1 must be a str or None, got int",
        ),
        (lambda: small_index().search(torch.randn(2), filter=5), ValueError, "got int"),
        (
            lambda: small_index().upsert([1], torch.randn(1, 3), [{}]),
            ValueError,
            "embeddings have dimension 3, the index has 2",
        ),
        (
            lambda: small_index().upsert([1, 1], torch.randn(2, 2), [{}] * 2),
            ValueError,
            "id 1 appears more than once",
        ),
        (
            lambda: small_index().upsert([1], torch.randn(2, 2), [{}] * 2),
            ValueError,
            "got 1 ids for 2 embeddings",
        ),
        (
            lambda: small_index().upsert([1], torch.randn(1, 2), []),
            ValueError,
            "got 0 attribute dicts for 1 embeddings",
        ),
        (lambda: small_index().upsert([-1], torch.randn(1, 2), [{}]), ValueError, "item id -1 is reserved"),
        (lambda: ItemIndex.build(torch.randn(2, 2), [{}] * 2, ids=[3, -1]), ValueError, "item id -1 is reserved"),
        (lambda: small_index().attributes_of([10, 77]), ValueError, r"unknown ids: \[77\]"),
        (lambda: small_index().embeddings_of([5]), ValueError, r"unknown ids: \[5\]"),
        (
            lambda: ItemIndex.build(torch.zeros(0, 2), []).attributes_of([1]),
            ValueError,
            r"unknown ids: \[1\]",
        ),
    ],
)
def test_validation(call, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    "expr, position, problem",
    [
        ("genre:Drama year:1995", 12, "expected AND, OR or end of filter"),
        ("genre:", 6, "expected a value after ':'"),
        ("year > 1 AND colour:red", 13, "unknown feature 'colour'"),
        ("genre < 3", 0, "feature 'genre' is not numeric"),
    ],
)
def test_bad_filters_name_the_position(expr: str, position: int, problem: str) -> None:
    with pytest.raises(FilterError) as info:
        small_index().search(torch.randn(2, 2), filter=["year:1", expr])
    assert info.value.position == position and problem in str(info.value)
    assert f"at position {position}" in str(info.value) and expr in str(info.value)


def test_concurrent_search_never_sees_a_torn_state() -> None:
    """Version v gives every item the embedding [127, id, v] (stored exactly in int8: scale 1) and
    attributes {"parity": v % 2}. Searching [0, 0, 1] and [0, 1, 0] under ``parity:0`` sees, in
    any consistent state, either nothing (odd v) or items whose first score is one even v and
    whose second score is their id."""
    m, versions = 40, 60
    ids = torch.arange(m)

    def state(v: int) -> tuple[torch.Tensor, list[dict]]:
        emb = torch.stack([torch.full((m,), 127.0), ids.float(), torch.full((m,), float(v))], dim=1)
        return emb, [{"parity": v % 2} for _ in ids]

    index = ItemIndex.build(*state(0), ids=ids, config=IndexConfig(compact_at=3 * m))
    errors: list[str] = []
    done = threading.Event()

    def writer() -> None:
        for v in range(1, versions):
            index.upsert(ids, *state(v))
            if v % 5 == 0:
                index.delete(ids[: m // 2])
                index.upsert(ids[: m // 2], *(x[: m // 2] for x in state(v)))
            if v % 7 == 0:
                index.compact()
        done.set()

    def reader() -> None:
        queries = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
        seen = 0
        while not done.is_set() or seen == 0:
            res = index.search(queries, k=m + 2, filter="parity:0")
            seen += 1
            found = res.ids[0] >= 0
            count = int(found.sum())
            if count not in (0, m // 2, m):
                errors.append(f"{count} items pass")
            v = set(res.scores[0, found].tolist())
            if count and (len(v) != 1 or int(v.pop()) % 2):
                errors.append(f"mixed or odd versions {sorted(set(res.scores[0, found].tolist()))}")
            second = res.ids[1] >= 0
            if not torch.equal(res.scores[1, second], res.ids[1, second].float()):
                errors.append("scores of one state paired with ids of another")

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[:5]
    assert index.attributes_of([0]) == [{"parity": (versions - 1) % 2}]


def test_save_load_round_trip(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    catalogue = [
        {
            "genre": ["Drama", "War"][: i % 3],
            "year": 1990 + i % 7,
            "tag": ["c07", 2020, "2020"][i % 3],
        }
        for i in range(50)
    ]
    index = ItemIndex.build(
        torch.randn(50, 4, generator=gen),
        catalogue,
        ids=torch.arange(50) * 7,
        config=IndexConfig(nlist=4, nprobe=2),
    )
    index.delete([0, 7])
    path = index.save(tmp_path / "idx")
    loaded = ItemIndex.load(path)
    assert loaded.config == index.config and torch.equal(loaded.ids, index.ids)
    assert torch.equal(loaded.embeddings_of(index.ids), index.embeddings_of(index.ids))
    assert loaded.attributes_of(index.ids) == index.attributes_of(index.ids)
    queries = torch.randn(4, 4, generator=gen)
    for expr in [None, "genre:War", "NOT year >= 1993 OR tag:2020", "tag IN (c07, nope)"]:
        a, b = loaded.search(queries, k=10, filter=expr), index.search(queries, k=10, filter=expr)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.scores, b.scores)
    index.upsert([1000], torch.ones(1, 4), [{"genre": "New"}])
    index.save(path)  # replacing a snapshot is allowed
    assert ItemIndex.load(path).attributes_of([1000]) == [{"genre": ["New"]}]


def test_load_refuses_other_snapshots_and_bad_parts(tmp_path: Path) -> None:
    write_snapshot(tmp_path / "other", {"weights": {"w": torch.ones(1)}}, {"model": {}})
    with pytest.raises(SnapshotError, match="holds no item index"):
        ItemIndex.load(tmp_path / "other")
    meta, tensors = small_index().to_snapshot_parts()
    with pytest.raises(ValueError, match=r"codes should be int8 \[4, 2\], got float64"):
        ItemIndex.from_snapshot_parts(meta, {**tensors, "codes": tensors["codes"].double()})
    with pytest.raises(ValueError, match=r"ids should be int64 \[4\]"):
        ItemIndex.from_snapshot_parts(meta, {**tensors, "ids": tensors["ids"][:3]})
    with pytest.raises(ValueError, match="id 10 appears more than once"):
        ItemIndex.from_snapshot_parts(meta, {**tensors, "ids": torch.tensor([10, 10, 11, 12])})
    with pytest.raises(ValueError, match="snapshot parts are malformed"):
        ItemIndex.from_snapshot_parts({**meta, "config": {"nlist": 3, "colour": 1}}, tensors)
    with pytest.raises(ValueError, match="attribute tensor 'attr.year.values'|'year.values' is missing"):
        ItemIndex.from_snapshot_parts(meta, {k: v for k, v in tensors.items() if k != "attr.year.values"})


def test_k_beyond_the_catalogue_only_pads() -> None:
    index = ItemIndex.build(torch.randn(5000, 8), [{"a": i % 3} for i in range(5000)])
    res = index.search(torch.randn(2, 8), k=100_000, filter="a:1")
    assert res.ids.shape == (2, 100_000)
    assert (res.ids >= 0).sum(1).tolist() == [1667, 1667]
    assert torch.isneginf(res.scores[:, 1667:]).all()
