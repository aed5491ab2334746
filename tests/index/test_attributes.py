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
from filter_oracle import catalogues, filter_trees, oracle, present, render, schema
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.index.attributes import AttributeStore
from sterling.index.filter import FilterError, parse


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
