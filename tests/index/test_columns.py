"""Attribute columns: compact storage (id and value dtypes, single / multi layout) that round-trips
exactly through an AttributeStore's snapshot parts and evaluates like the plain-Python oracle."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from filter_oracle import _OPS, oracle, schema

from sterling.index.attributes import AttributeStore
from sterling.index.columns import CategoricalColumn, id_dtype
from sterling.index.filter import Compare, Term, parse


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
