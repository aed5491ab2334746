"""AttributeStore: exact evaluation against the plain-Python oracle, round trips and validation."""

from __future__ import annotations

import json
import math
import random
import re
import sys

import numpy as np
import pytest
import torch
from filter_oracle import _OPS, catalogues, filter_trees, oracle, present, render, schema
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.index.attributes import AttributeStore, CategoricalColumn, id_dtype
from sterling.index.filter import Compare, FilterError, Term, parse


def canonical(catalogue: list[dict]) -> list[dict]:
    """The build input as ``decode`` returns it: missing values dropped, lists for list features."""
    kinds = schema(catalogue)
    multi = {n for n in kinds if any(isinstance(item.get(n), list) for item in catalogue)}
    out = []
    for item in catalogue:
        row = {}
        for name, value in item.items():
            if present(value):
                row[name] = present(value) if name in multi else value
        out.append(row)
    return out


@settings(max_examples=60, deadline=None)
@given(data=st.data(), catalogue=catalogues())
def test_evaluate_matches_oracle(data: st.DataObject, catalogue: list[dict]) -> None:
    kinds = schema(catalogue)
    store = AttributeStore.build(catalogue)
    assert len(store) == len(catalogue)
    if not kinds:
        return
    for _ in range(3):
        tree = data.draw(filter_trees(kinds))
        text = render(tree, data.draw(st.randoms(use_true_random=False)))
        expected = [oracle(tree, item, kinds) for item in catalogue]
        assert store.evaluate_filter(text).tolist() == expected, text
        assert store.evaluate(tree).tolist() == expected


@settings(max_examples=30, deadline=None)
@given(catalogue=catalogues())
def test_decode_round_trip(catalogue: list[dict]) -> None:
    store = AttributeStore.build(catalogue)
    decoded = store.decode(torch.arange(len(catalogue)))
    assert decoded == canonical(catalogue)
    types = lambda row: {k: (type(v), [type(x) for x in present(v)]) for k, v in row.items()}  # noqa: E731
    assert [types(row) for row in decoded] == [types(row) for row in canonical(catalogue)]


@settings(max_examples=30, deadline=None)
@given(data=st.data(), catalogue=catalogues(anchored=True), more=catalogues(max_size=20))
def test_take_append_equals_build(data: st.DataObject, catalogue: list[dict], more: list[dict]) -> None:
    rows = data.draw(st.lists(st.integers(0, len(catalogue) - 1), unique=True))
    rows = sorted(set(rows) | {0, 1})  # keep the anchors, so every feature keeps its kind
    store = AttributeStore.build(catalogue).take(torch.tensor(rows)).append(more)
    expected = [catalogue[r] for r in rows] + more
    fresh = AttributeStore.build(expected)
    assert store.decode(range(len(expected))) == canonical(expected)
    kinds = schema(expected)
    for _ in range(3):
        tree = data.draw(filter_trees(kinds))
        assert torch.equal(store.evaluate(tree), fresh.evaluate(tree))
        assert store.evaluate(tree).tolist() == [oracle(tree, item, kinds) for item in expected]


@settings(max_examples=20, deadline=None)
@given(data=st.data(), catalogue=catalogues())
def test_parts_round_trip(data: st.DataObject, catalogue: list[dict]) -> None:
    store = AttributeStore.build(catalogue)
    meta = json.loads(json.dumps(store.meta()))
    back = AttributeStore.from_parts(meta, store.to_tensors())
    assert back.decode(range(len(catalogue))) == store.decode(range(len(catalogue)))
    kinds = schema(catalogue)
    if kinds:
        tree = data.draw(filter_trees(kinds))
        assert torch.equal(back.evaluate(tree), store.evaluate(tree))


def test_semantics() -> None:
    store = AttributeStore.build(
        [
            {"genre": ["Drama", "War"], "year": 1995, "tag": "2020"},
            {"genre": "Comedy", "year": None, "tag": 7},
            {"year": 2001.0, "tag": "x"},
            {"genre": []},
        ]
    )
    ev = lambda expr: store.evaluate_filter(expr).tolist()  # noqa: E731
    assert ev("genre:Drama") == [True, False, False, False]
    assert ev("genre:Horror") == [False] * 4
    assert ev("NOT genre:Horror") == [True] * 4
    assert ev("year >= 1995") == [True, False, True, False]
    assert ev("NOT year >= 1995") == [False, True, False, True]
    assert ev("year != 1995") == [False, False, True, False]
    assert ev('year:"2001"') == [False, False, True, False]
    assert ev("year:abc") == [False] * 4
    assert ev("year IN (1995, 2001)") == [True, False, True, False]
    assert ev("year IN (0, 2001)") == [False, False, True, False]  # missing is not 0
    assert ev("year <= 0") == [False] * 4
    assert ev("tag:2020") == [True, False, False, False]  # int token finds the string "2020"
    assert ev("tag:7") == [False, True, False, False]
    assert ev('tag:"7"') == [False] * 4
    assert ev("tag IN (7, x)") == [False, True, True, False]
    both = AttributeStore.build([{"tag": 2020}, {"tag": "2020"}])
    assert both.evaluate_filter("tag:2020").tolist() == [True, True]  # the int and its string
    assert both.evaluate_filter('tag:"2020"').tolist() == [False, True]


def test_filter_errors_name_feature_and_position() -> None:
    store = AttributeStore.build([{"genre": "Drama", "year": 1995}])
    with pytest.raises(FilterError) as info:
        store.evaluate_filter("year > 3 AND colour:red")
    assert info.value.position == 13
    assert "unknown feature 'colour'" in str(info.value) and "genre, year" in str(info.value)
    with pytest.raises(FilterError) as info:
        store.evaluate_filter("NOT genre >= 3")
    assert info.value.position == 4 and "feature 'genre' is not numeric" in str(info.value)
    with pytest.raises(FilterError) as info:
        store.evaluate(parse("x:1"))
    assert info.value.expr is None and str(info.value).startswith("unknown feature 'x'")


def test_kinds_and_numpy_values() -> None:
    store = AttributeStore.build([{"a": np.int64(3), "b": [1, 2], "c": np.float32(0.5)}, {"a": 4}])
    meta = {f["name"]: f for f in store.meta()["features"]}
    assert meta["a"] == {"name": "a", "kind": "numeric", "integral": True}
    assert meta["b"]["kind"] == "categorical" and meta["b"]["vocab"] == [1, 2]
    assert meta["c"]["integral"] is False
    assert store.decode([0]) == [{"a": 3, "b": [1, 2], "c": 0.5}]
    assert type(store.decode([0])[0]["a"]) is int


@pytest.mark.parametrize(
    "rows, message",
    [
        ({"a": 1}, "attributes must be a list of dicts"),
        (["x"], "item 0: attributes must be a dict, got str"),
        ([{"a": 1}, {"a": {"b": 1}}], "item 1, feature 'a': unsupported value type dict"),
        ([{"a": math.nan}], "item 0, feature 'a': value must be finite"),
        ([{"a": math.inf}], "item 0, feature 'a': value must be finite"),
        ([{"a": True}], "item 0, feature 'a': bool values are not supported"),
        ([{"a": [1.5]}], "item 0, feature 'a': list elements must be str or int"),
        ([{"a": ["x", [1]]}], "item 0, feature 'a': unsupported value type list"),
        ([{"a": "x"}, {"a": 1.5}], "item 1, feature 'a': float 1.5 in a categorical feature"),
        ([{"a": 2**60}], "item 0, feature 'a': int 1152921504606846976 is too large"),
        ([{"a b": 1}], "item 0: feature name 'a b' cannot be used in filters"),
        ([{"NOT": 1}], "feature name 'NOT' cannot be used"),
        ([{3: 1}], "feature name 3 cannot be used"),
    ],
)
def test_build_validation(rows: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        AttributeStore.build(rows)  # type: ignore[arg-type]


def test_append_validation_and_growth() -> None:
    store = AttributeStore.build([{"genre": "Drama", "year": 1995}])
    with pytest.raises(ValueError, match="item 1: unknown feature 'x'; known features: genre, year"):
        store.append([{"genre": "War"}, {"x": 1}])
    with pytest.raises(ValueError, match="item 0, feature 'year': the feature is numeric, got list"):
        store.append([{"year": [1995]}])
    with pytest.raises(ValueError, match="feature 'year': the feature is numeric, got str 'abc'"):
        store.append([{"year": "abc"}])
    grown = store.append([{"genre": ["Noir", "Drama"], "year": 2000.5}])
    assert grown.evaluate_filter("genre:Noir").tolist() == [False, True]
    assert grown.decode([0, 1]) == [
        {"genre": ["Drama"], "year": 1995.0},
        {"genre": ["Noir", "Drama"], "year": 2000.5},
    ]
    assert store.decode([0]) == [{"genre": "Drama", "year": 1995}]  # the original is unchanged
    with pytest.raises(IndexError, match="row 1 out of range for 1 items"):
        store.decode([1])


def test_take_compacts_vocabulary() -> None:
    store = AttributeStore.build([{"t": ["a", "b"]}, {"t": ["c"]}, {"t": ["b"]}])
    taken = store.take(torch.tensor([2, 1]))
    assert taken.meta()["features"][0]["vocab"] == ["b", "c"]
    assert taken.decode([0, 1]) == [{"t": ["b"]}, {"t": ["c"]}]
    assert taken.evaluate_filter("t:a").tolist() == [False, False]
    # the int token matches both forms, whichever values the vocabulary holds
    tags = AttributeStore.build([{"tag": 2020}, {"tag": "2020"}])
    assert tags.evaluate_filter("tag:2020").tolist() == [True, True]
    assert tags.take(torch.tensor([1])).evaluate_filter("tag:2020").tolist() == [True]


def test_nbytes() -> None:
    store = AttributeStore.build([{"g": ["ab", 5]}, {"y": 1}])
    # g: multi layout, offsets 3 x int32 + value_ids 2 x int8; y: values 2 x int8 (-128 missing)
    g = store.columns["g"]
    vocab = sys.getsizeof(g.vocab) + sys.getsizeof("ab") + sys.getsizeof(5)
    assert store.nbytes() == 12 + 2 + 2 + vocab + sys.getsizeof(g.lookup)


def test_from_parts_validation() -> None:
    store = AttributeStore.build([{"g": ["a", "b"], "y": 1}, {"g": "c"}])
    meta, tensors = store.meta(), store.to_tensors()
    with pytest.raises(ValueError, match="attribute tensor 'g.offsets' is missing"):
        AttributeStore.from_parts(meta, {k: v for k, v in tensors.items() if k != "g.offsets"})
    with pytest.raises(
        ValueError,
        match=r"'y.values' should be torch.int8 or torch.int16 or torch.int32 or torch.float64 "
        r"\[2\], got torch.float32",
    ):
        AttributeStore.from_parts(meta, {**tensors, "y.values": tensors["y.values"].float()})
    with pytest.raises(ValueError, match=r"'g.offsets' should be torch.int32 \[3\], got .*int64"):
        AttributeStore.from_parts(meta, {**tensors, "g.offsets": tensors["g.offsets"].long()})
    with pytest.raises(ValueError, match=r"'g.value_ids' should be torch.int8 \[\*\], got .*int32"):
        AttributeStore.from_parts(meta, {**tensors, "g.value_ids": tensors["g.value_ids"].int()})
    with pytest.raises(ValueError, match="offsets are not a valid CSR index"):
        AttributeStore.from_parts(meta, {**tensors, "g.offsets": torch.tensor([0, 3, 2], dtype=torch.int32)})
    with pytest.raises(ValueError, match="value ids outside the vocabulary of 3"):
        AttributeStore.from_parts(meta, {**tensors, "g.value_ids": torch.tensor([0, 1, 3], dtype=torch.int8)})
    with pytest.raises(ValueError, match="numeric values must be finite"):
        AttributeStore.from_parts(meta, {**tensors, "y.values": torch.tensor([1.0, math.inf], dtype=torch.float64)})
    bad_vocab = json.loads(json.dumps(meta))
    bad_vocab["features"][0]["vocab"] = ["a", "a", "c"]
    with pytest.raises(ValueError, match="vocabulary must hold distinct str/int values"):
        AttributeStore.from_parts(bad_vocab, tensors)
    with pytest.raises(ValueError, match="attribute store meta is malformed"):
        AttributeStore.from_parts({"features": []}, tensors)


def test_random_large_catalogue_against_oracle() -> None:
    rnd = random.Random(0)
    genres = [f"g{i}" for i in range(50)]
    catalogue = [
        {
            "genre": rnd.sample(genres, rnd.randint(0, 4)),
            "year": rnd.choice([None, *range(1950, 2020)]),
        }
        for _ in range(3000)
    ]
    store = AttributeStore.build(catalogue)
    kinds = schema(catalogue)
    tree = parse("(genre IN (g1, g2) OR year < 1960) AND NOT genre:g3")
    assert store.evaluate(tree).tolist() == [oracle(tree, item, kinds) for item in catalogue]


# ---- compact encodings ------------------------------------------------------------------------


def round_trip(store: AttributeStore) -> AttributeStore:
    meta = json.loads(json.dumps(store.meta()))
    back = AttributeStore.from_parts(meta, store.to_tensors())
    assert back.decode(range(len(store))) == store.decode(range(len(store)))
    assert {k: v.dtype for k, v in back.to_tensors().items()} == {k: v.dtype for k, v in store.to_tensors().items()}
    return back


@pytest.mark.parametrize(
    "vocab_size, dtype",
    [
        (1, torch.int8),
        (127, torch.int8),
        (128, torch.int8),  # ids 0..127 and -1 still fit int8
        (129, torch.int16),
        (32767, torch.int16),
        (32768, torch.int16),
        (32769, torch.int32),
    ],
)
def test_id_dtype_at_vocabulary_boundaries(vocab_size: int, dtype: torch.dtype) -> None:
    assert id_dtype(vocab_size) == dtype
    catalogue: list[dict] = [{"f": f"v{i}", "n": i} for i in range(vocab_size)] + [{"n": 0}]
    store = AttributeStore.build(catalogue)
    column = store.columns["f"]
    assert isinstance(column, CategoricalColumn) and column.single and not column.multi
    tensors = store.to_tensors()
    assert set(tensors) == {"f.ids", "n.values"}
    assert tensors["f.ids"].dtype == dtype and tensors["f.ids"].shape == (vocab_size + 1,)
    assert int(tensors["f.ids"][-1]) == -1  # the item without f
    # multi-valued: value ids take the same dtype, offsets int32
    multi = AttributeStore.build([{"f": [f"v{i}", "v0"]} for i in range(vocab_size)] + [{}])
    m_tensors = multi.to_tensors()
    assert set(m_tensors) == {"f.offsets", "f.value_ids"}
    assert m_tensors["f.value_ids"].dtype == dtype and m_tensors["f.offsets"].dtype == torch.int32
    for s in (store, multi):
        back = round_trip(s)
        last = f"v{vocab_size - 1}"
        assert back.evaluate_filter(f"f:{last}").nonzero().squeeze(1).tolist() == [vocab_size - 1]
        assert back.evaluate_filter("NOT f IN (v0, zzz)").tolist()[-2:] == [
            vocab_size > 1 and s is store,
            True,
        ]
    assert store.decode([vocab_size - 1, vocab_size]) == [
        {"f": f"v{vocab_size - 1}", "n": vocab_size - 1},
        {"n": 0},
    ]
    # int storage of n: the smallest dtype whose minimum (the missing marker) is below every value
    assert tensors["n.values"].dtype == (
        torch.int8 if vocab_size <= 128 else torch.int16 if vocab_size <= 32768 else torch.int32
    )


def test_three_small_vocabulary_features_take_three_bytes_per_item() -> None:
    n = 10_000
    rnd = random.Random(0)
    catalogue = [
        {
            "half": f"h{rnd.randrange(2)}",
            "tenth": f"t{rnd.randrange(10)}",
            "hundredth": rnd.randrange(100),
        }
        for _ in range(n)
    ]
    catalogue[5] = {"half": "h0", "hundredth": "u"}  # a str among ints: still categorical
    store = AttributeStore.build(catalogue)
    tensors = store.to_tensors()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == {
        "half.ids": (torch.int8, (n,)),
        "tenth.ids": (torch.int8, (n,)),
        "hundredth.ids": (torch.int8, (n,)),
    }
    vocab_bytes = store.nbytes() - 3 * n
    assert 0 < vocab_bytes < 20_000  # the vocabularies, lookup dicts included
    assert store.nbytes() / n < 5
    kinds = schema(catalogue)
    tree = parse("half:h1 AND (tenth IN (t1, t2) OR NOT hundredth:42) OR hundredth:u")
    assert store.evaluate(tree).tolist() == [oracle(tree, item, kinds) for item in catalogue]


def test_layout_follows_values_not_lists() -> None:
    store = AttributeStore.build([{"g": ["a"]}, {"g": "b"}, {"g": []}, {}])
    column = store.columns["g"]
    assert isinstance(column, CategoricalColumn) and column.single and column.multi
    assert store.to_tensors()["g.ids"].tolist() == [0, 1, -1, -1]
    assert store.decode(range(4)) == [{"g": ["a"]}, {"g": ["b"]}, {}, {}]
    # a value repeated on one item keeps the multi layout (decode returns it twice)
    twice = AttributeStore.build([{"g": ["a", "a"]}, {"g": "b"}])
    assert not twice.columns["g"].single  # type: ignore[union-attr]
    assert twice.decode([0, 1]) == [{"g": ["a", "a"]}, {"g": ["b"]}]
    assert twice.evaluate_filter("g:a").tolist() == [True, False]
    round_trip(store), round_trip(twice)


def test_append_turns_single_into_multi_and_take_back() -> None:
    store = AttributeStore.build([{"g": "a", "y": 1}, {"y": 2}, {"g": "b"}])
    assert store.columns["g"].single  # type: ignore[union-attr]
    grown = store.append([{"g": ["c", "a"]}, {"g": "d"}, {}])
    g = grown.columns["g"]
    assert isinstance(g, CategoricalColumn) and not g.single and g.multi
    assert g.offsets is not None and g.offsets.dtype == torch.int32
    assert g.offsets.tolist() == [0, 1, 1, 2, 4, 5, 5]
    assert g.value_ids.dtype == torch.int8 and g.value_ids.tolist() == [0, 1, 2, 0, 3]
    assert grown.decode(range(6)) == [
        {"g": ["a"], "y": 1},
        {"y": 2},
        {"g": ["b"]},
        {"g": ["c", "a"]},
        {"g": ["d"]},
        {},
    ]
    assert grown.evaluate_filter("g:a").tolist() == [True, False, False, True, False, False]
    assert grown.evaluate_filter("g IN (c, d)").tolist() == [False] * 3 + [True, True, False]
    assert store.decode(range(3)) == [{"g": "a", "y": 1}, {"y": 2}, {"g": "b"}]  # unchanged
    rows = torch.tensor([4, 1, 0, 5])
    taken = grown.take(rows)  # no item with two values left: back to one id per item
    tg = taken.columns["g"]
    assert isinstance(tg, CategoricalColumn) and tg.single and tg.vocab == ("a", "d")
    assert taken.to_tensors()["g.ids"].tolist() == [1, -1, 0, -1]
    assert taken.decode(range(4)) == [{"g": ["d"]}, {"y": 2}, {"g": ["a"], "y": 1}, {}]
    for text in ["g:a", "g:d", "NOT g:c", "y >= 2"]:
        assert torch.equal(taken.evaluate_filter(text), grown.evaluate_filter(text)[rows])
    round_trip(grown), round_trip(taken)


def test_vocabulary_growth_widens_ids() -> None:
    store = AttributeStore.build([{"f": f"v{i}"} for i in range(128)])
    assert store.to_tensors()["f.ids"].dtype == torch.int8
    grown = store.append([{"f": "new"}, {"f": "v127"}, {}])
    ids = grown.to_tensors()["f.ids"]
    assert ids.dtype == torch.int16 and ids[-3:].tolist() == [128, 127, -1]
    assert ids[:128].tolist() == list(range(128))
    assert grown.evaluate_filter("f:new").nonzero().squeeze(1).tolist() == [128]
    # take keeps only the values still present, so the ids can narrow again
    assert grown.take(torch.tensor([128, 3])).to_tensors()["f.ids"].dtype == torch.int8


@pytest.mark.parametrize(
    "values, dtype",
    [
        ([1, -5, None, 127], torch.int8),
        ([-127, 0], torch.int8),
        ([-128, 0], torch.int16),  # -128 is int8's missing marker
        ([1, 32767, None], torch.int16),
        ([-32768], torch.int32),
        ([2**31 - 1, -(2**31) + 1, None], torch.int32),
        ([2**31, 1], torch.float64),
        ([2**53, -(2**53)], torch.float64),
        ([1.0, 2.0, None], torch.int8),  # integer-valued floats: decode still gives floats
        ([0.5, 1, None], torch.float64),
        ([-0.0, 1], torch.float64),  # -0.0 is kept
        ([None, 1e300], torch.float64),
    ],
)
def test_numeric_storage_is_exact(values: list, dtype: torch.dtype) -> None:
    catalogue = [{"x": v} for v in values] + [{}]
    store = AttributeStore.build(catalogue)
    data = store.to_tensors()["x.values"]
    assert data.dtype == dtype and data.shape == (len(catalogue),)
    integral = all(isinstance(v, int) for v in values if v is not None)
    expected = [{} if v is None else {"x": v if integral else float(v)} for v in values] + [{}]
    decoded = store.decode(range(len(catalogue)))
    assert decoded == expected
    assert [type(d.get("x")) for d in decoded] == [type(e.get("x")) for e in expected]
    assert [math.copysign(1, d["x"]) for d in decoded if "x" in d] == [
        math.copysign(1, v) for v in values if v is not None
    ]
    present_values = [float(v) for v in values if v is not None]
    numbers = {
        b + d for b in present_values + [0.0, -128.0, 127.0, 2.0**31, -(2.0**31)] for d in (-1.0, -0.5, 0.0, 0.5, 1.0)
    } | {math.inf, -math.inf, 1e20, -1e20}
    back = round_trip(store)
    for number in sorted(numbers):
        for op in (">=", "<=", ">", "<", "=", "!="):
            want = [v is not None and _OPS[op](float(v), number) for v in values] + [False]
            got = store.evaluate(Compare("x", op, number)).tolist()
            assert got == want, (op, number)
            assert back.evaluate(Compare("x", op, number)).tolist() == want
        want = [v is not None and float(v) == number for v in values] + [False]
        assert store.evaluate(Term("x", number)).tolist() == want
        if math.isfinite(number):
            assert store.evaluate(Term("x", repr(number))).tolist() == want


def test_numeric_storage_on_append() -> None:
    store = AttributeStore.build([{"y": 1990}, {"y": None}])
    assert store.to_tensors()["y.values"].dtype == torch.int16
    grown = store.append([{"y": 2.5}, {"y": 2**40}])
    assert grown.to_tensors()["y.values"].dtype == torch.float64
    assert grown.decode(range(4)) == [{"y": 1990.0}, {}, {"y": 2.5}, {"y": 2.0**40}]
    assert grown.evaluate_filter("y > 2").tolist() == [True, False, True, True]
    ints = store.append([{"y": 70000}])
    assert ints.to_tensors()["y.values"].dtype == torch.int32
    assert ints.decode(range(3)) == [{"y": 1990}, {}, {"y": 70000}]


@settings(max_examples=40, deadline=None)
@given(data=st.data(), catalogue=catalogues())
def test_evaluate_rows_equals_take_then_evaluate(data: st.DataObject, catalogue: list[dict]) -> None:
    kinds = schema(catalogue)
    store = AttributeStore.build(catalogue)
    if not kinds or not catalogue:
        return
    rows = torch.tensor(data.draw(st.lists(st.integers(0, len(catalogue) - 1), max_size=60)), dtype=torch.int64)
    for _ in range(3):
        tree = data.draw(filter_trees(kinds))
        got = store.evaluate_rows(tree, rows)
        assert got.dtype == torch.bool and got.shape == rows.shape
        assert torch.equal(got, store.take(rows).evaluate(tree))
        assert got.tolist() == [oracle(tree, catalogue[r], kinds) for r in rows.tolist()]


def test_evaluate_rows_errors_and_columns_touched() -> None:
    store = AttributeStore.build([{"g": ["a", "b"], "y": 3}, {"g": "c"}, {"y": 5}])
    rows = torch.tensor([2, 0, 0])
    assert store.evaluate_rows(parse("g:a OR y > 4"), rows).tolist() == [True, True, True]
    assert store.evaluate_rows(parse("g:a"), torch.zeros(0, dtype=torch.int64)).tolist() == []
    with pytest.raises(FilterError, match="unknown feature 'x'"):
        store.evaluate_rows(parse("x:1"), rows)
    with pytest.raises(FilterError, match="feature 'g' is not numeric"):
        store.evaluate_rows(parse("g > 1"), rows, "g > 1")
    with pytest.raises(IndexError, match="rows out of range for 3 items"):
        store.evaluate_rows(parse("g:a"), torch.tensor([3]))
    with pytest.raises(IndexError, match="rows out of range"):
        store.evaluate_rows(parse("g:a"), torch.tensor([-1]))


def test_build_fast_paths_equal_item_by_item() -> None:
    class Row(dict):  # a dict subclass takes the generic Mapping path
        pass

    rnd = random.Random(1)
    catalogue = [
        {
            k: v
            for k, v in {
                "s": rnd.choice(["a", "b", None]),
                "m": rnd.choice([[], ["x"], ("x", "y"), None, "z", 3]),
                "n": rnd.choice([1, 2.5, None, np.int64(7)]),
            }.items()
            if rnd.random() < 0.8
        }
        for _ in range(300)
    ]
    a = AttributeStore.build(catalogue)
    b = AttributeStore.build([Row(item) for item in catalogue])
    assert a.meta() == b.meta()
    assert a.decode(range(300)) == b.decode(range(300))
    for name, t in a.to_tensors().items():
        torch.testing.assert_close(t, b.to_tensors()[name], rtol=0, atol=0, equal_nan=True)


def test_feature_order_and_validation_order() -> None:
    # features in the order their first value appears; all-missing features have no column
    store = AttributeStore.build([{"a": None, "b": 1, "z": []}, {"c": "x", "a": 2}])
    assert store.features == ("b", "c", "a")
    assert store.append([{"q": None}]).decode([2]) == [{}]  # an unknown feature, but missing
    # the first bad item wins, whichever feature or check finds it
    with pytest.raises(ValueError, match=re.escape("item 0, feature 'b': value must be finite")):
        AttributeStore.build([{"a": 1, "b": math.nan}, {"a b": 1}, "x"])
    with pytest.raises(ValueError, match=re.escape("item 1: feature name 'a b' cannot be used")):
        AttributeStore.build([{"a": 1}, {"a b": 1}, "x", {"b": math.nan}])
    with pytest.raises(ValueError, match=re.escape("item 1: attributes must be a dict")):
        AttributeStore.build([{"a": 1}, "x", {"b": math.nan}])
    with pytest.raises(ValueError, match=re.escape("item 1, feature 'a': float 2.5 in a categ")):
        AttributeStore.build([{"a": "s", "b": 2**60}, {"a": 2.5}])
    with pytest.raises(ValueError, match=re.escape("item 2, feature 'b': int 1152921504606846976")):
        AttributeStore.build([{"b": 1, "a": "s"}, {"a": 2.5}, {"b": 2**60}])
