"""RetrievalModel.upsert / delete / compact: the served model after live updates answers like a model
composed afresh over the updated catalogue."""

import random
from dataclasses import replace

import pytest
import torch
from test_model import NLIST, TASKS, D, compose

from sterling.index.item_index import IndexConfig, ItemIndex
from sterling.retrieval.item_table import cache_rows
from sterling.retrieval.model import RetrievalModel
from sterling.retrieval.rank import Trace

EXACT = IndexConfig(nlist=NLIST, nprobe=NLIST)
FILTERS = [None, "genre:drama", "genre:new AND year >= 2000", "NOT genre:comedy"]


def new_items(rng: random.Random, ids: list[int]):
    emb = torch.nn.functional.normalize(torch.randn(len(ids), D), dim=-1)
    attrs = [
        {"genre": rng.sample(["drama", "comedy", "new"], rng.randint(1, 2)), "year": rng.randint(1980, 2020)}
        for _ in ids
    ]
    return emb, attrs


def rebuilt(model: RetrievalModel, catalogue: dict[int, tuple[torch.Tensor, dict]], overarch) -> RetrievalModel:
    """The same weights composed over an index built from scratch of ``catalogue`` (id → (stored
    embedding, attributes)), with each item's cache row as the updated model holds it."""
    ids = torch.tensor(sorted(catalogue))
    emb = torch.stack([catalogue[int(i)][0] for i in ids])
    index = ItemIndex.build(emb, [catalogue[int(i)][1] for i in ids], ids=ids, config=EXACT)
    cache = model.index.table_rows(model.rows_of(index.executor_tensors()["ids"]))
    return RetrievalModel(model.user_tower, model.task_queries, index, cache, overarch, model.config).eval()


@pytest.mark.parametrize("kind", [None, "mol"])
@pytest.mark.parametrize("seed", [0, 1])
def test_updates_answer_like_a_model_composed_over_the_new_catalogue(kind, seed):
    model, attrs, ids = compose(kind, k0=30, seed=seed, config=EXACT)
    overarch = model.overarch
    emb = model.index.embeddings_of(ids)  # the stored vectors: rebuilding from them quantizes to the same codes
    catalogue = {int(i): (emb[r], attrs[r]) for r, i in enumerate(ids.tolist())}
    rng = random.Random(seed)
    gone = rng.sample(sorted(catalogue), 40)
    replaced = rng.sample(sorted(set(catalogue) - set(gone)), 20)
    added = list(range(10**6, 10**6 + 30))
    for batch in (replaced[:10] + added[:15], replaced[10:] + added[15:], added[:5]):  # an id upserted twice
        vectors, attributes = new_items(rng, batch)
        model.upsert(batch, vectors, attributes)
        catalogue |= {i: (model.index.embeddings_of([i])[0], a) for i, a in zip(batch, attributes)}
    assert model.delete(gone + [123456789]) == len(gone)
    for i in gone:
        del catalogue[i]
    reference = rebuilt(model, catalogue, overarch)
    histories = [rng.sample(sorted(catalogue), rng.randint(0, 10)) + added[: rng.randint(0, 3)] for _ in range(6)]
    inputs, ref_inputs = model.inputs(histories), reference.inputs(histories)
    for flt in FILTERS:
        got, want = model(inputs, filter=flt, k=20), reference(ref_inputs, filter=flt, k=20)
        assert torch.equal(got.ids, want.ids), flt
        torch.testing.assert_close(got.scores, want.scores)
        assert not set(got.ids.flatten().tolist()) & set(gone)
    rank_ids = torch.tensor([added[:4] + replaced[:2]] * len(histories))
    torch.testing.assert_close(model.rank(inputs, rank_ids), reference.rank(ref_inputs, rank_ids))
    model.compact()  # the model's own rows now match the index's
    assert model.index.fresh_items == 0 and len(model.index.ids) == len(catalogue)
    live = [h for h in histories if not set(h) & set(gone)]
    for flt in FILTERS:
        got, want = model(model.inputs(live), filter=flt, k=20), reference(reference.inputs(live), filter=flt, k=20)
        assert torch.equal(got.ids, want.ids), flt


def test_an_upserted_item_is_found_and_a_deleted_one_never():
    model, _, ids = compose("mlp", k0=600, config=EXACT)
    target, vector = 10**7, torch.nn.functional.normalize(torch.randn(1, D), dim=-1)
    model.upsert([target], vector, [{"genre": ["unique"], "year": 1}])
    assert torch.equal(
        model.index.table_rows(model.rows_of([target])).float(),
        cache_rows(vector, model.overarch, torch.float16).float(),
    )
    got = model.recommend([int(ids[0])], filter="genre:unique", k=5)
    assert got.ids[0].tolist() == [target, -1, -1, -1, -1]
    model.delete([target])
    assert (
        model.recommend([target], filter="genre:unique", k=5).ids[0].tolist() == [-1] * 5
    )  # still readable in a history
    every = model.recommend([], k=600).ids[0]
    assert target not in every.tolist() and int((every >= 0).sum()) == len(ids)


def test_a_bad_update_changes_nothing():
    model, _, ids = compose(None, k0=20)
    inputs = model.inputs([[int(ids[0])]])
    before = model(inputs, k=10)
    for call in (
        lambda: model.upsert([1, 1], torch.randn(2, D), [{"year": 1}] * 2),
        lambda: model.upsert([1], torch.randn(1, D + 1), [{"year": 1}]),
        lambda: model.upsert([1], torch.full((1, D), float("nan")), [{"year": 1}]),
        lambda: model.upsert([1], torch.full((1, D), 1e30), [{"year": 1}]),  # finite, but not in the fp16 cache
        lambda: model.upsert([1], torch.randn(1, D), [{"colour": "red"}]),
    ):
        with pytest.raises(ValueError):
            call()
    assert model.index.fresh_items == 0
    assert torch.equal(model(inputs, k=10).ids, before.ids)


def test_self_compaction_on_upsert_keeps_the_model_consistent():
    config = IndexConfig(nlist=NLIST, nprobe=NLIST, compact_at=8)
    model, _, ids = compose("mol", k0=50, config=config)
    rng = random.Random(3)
    added = list(range(5 * 10**6, 5 * 10**6 + 12))
    vectors, attributes = new_items(rng, added)
    model.upsert(added[:6], vectors[:6], attributes[:6])
    assert model.index.fresh_items == 6
    model.upsert(added[6:], vectors[6:], attributes[6:])  # 12 >= compact_at: the index compacts itself
    assert model.index.fresh_items == 0
    got = model.recommend(added[:3], filter="genre:new", k=50).ids[0]
    want = {i for i, a in zip(added, attributes) if "new" in a["genre"]}
    assert want <= set(got.tolist())
    torch.testing.assert_close(
        model.rank(model.inputs([[]]), torch.tensor([added])), rebuilt_rank(model, added, vectors)
    )


def rebuilt_rank(model: RetrievalModel, added: list[int], vectors: torch.Tensor) -> torch.Tensor:
    """OverArch's scores of freshly computed cache rows of ``added``, with an empty history."""
    users, queries = model.encode(model.inputs([[]]))
    history, mask = model.history(model.inputs([[]]))
    state = cache_rows(vectors, model.overarch, torch.float16).float()[None]
    with torch.no_grad():
        return torch.sigmoid(model.overarch(users, queries, history, mask, state))


def test_trace_names_every_stage_and_counts_candidates():
    model, _, ids = compose("mol", k0=25)
    trace = Trace()
    model(model.inputs([[int(ids[0])], []]), filter=["genre:drama", None], k=10, trace=trace)
    assert set(trace.seconds) == {"user_tower", "ann", "overarch", "value_model"}
    assert all(s >= 0 for s in trace.seconds.values())
    assert trace.candidates.shape == (2,) and 25 <= int(trace.candidates.min()) <= len(TASKS) * 25


def test_a_value_formula_per_call():
    model, _, ids = compose("mol", k0=25, formula="click")
    inputs = model.inputs([[int(ids[0])]])
    by_like = model(inputs, k=10, value="like")
    torch.testing.assert_close(by_like.scores, by_like.task_scores[..., 1])
    assert (by_like.scores.diff() <= 0).all()
    torch.testing.assert_close(model(inputs, k=10).scores, model(inputs, k=10).task_scores[..., 0])


@pytest.mark.parametrize("kind", [None, "mol"])
def test_an_empty_batch_is_answered_empty(kind):
    model, _, _ = compose(kind, k0=20)
    out = model(model.inputs([]), k=5)
    assert out.ids.shape == (0, 5) and out.scores.shape == (0, 5) and out.task_scores.shape == (0, 5, len(TASKS))
    assert model.rank(model.inputs([]), torch.zeros(0, 3, dtype=torch.int64)).shape == (0, 3, len(TASKS))


def test_the_parts_must_fit_together():
    model, _, _ = compose("mol", k0=20)
    parts = (model.user_tower, model.task_queries, model.index, model.static_tensors()["cache"], model.overarch)
    config = model.config
    for changes, message in (
        ({"features": ("weather",)}, "not the user tower's"),
        ({"max_history": 13}, "at most 12 events"),
        ({"tasks": ("a", "b")}, "OverArch scores 3 tasks"),
    ):
        with pytest.raises(ValueError, match=message):
            RetrievalModel(*parts, replace(config, **changes))
    with pytest.raises(ValueError, match="features must be a tuple"):
        replace(config, features="surface")


def test_an_upsert_is_stored_once_and_quantized_once_and_a_filter_parsed_once(monkeypatch):
    """One owner of item rows: an upsert through the model quantizes each embedding once and adds
    one index row holding both its code and its cache row (no second store); a request's filter is
    parsed once, from the service's check down to the fresh rows' exact check."""
    from sterling.index import filter as filter_module
    from sterling.index import item_index as item_index_module

    model, _, _ = compose("mol", k0=50)
    quantized, parsed = [], []
    quantize, parse = item_index_module.quantize, filter_module._Parser.parse
    monkeypatch.setattr(
        item_index_module, "quantize", lambda x, *a, **kw: quantized.append(len(x)) or quantize(x, *a, **kw)
    )
    monkeypatch.setattr(filter_module._Parser, "parse", lambda self: parsed.append(self) or parse(self))
    rows_before = len(model.index.executor_tensors()["ids"])
    vectors, attributes = new_items(random.Random(5), [7 * 10**6, 7 * 10**6 + 1])
    model.upsert([7 * 10**6, 7 * 10**6 + 1], vectors, attributes)
    assert quantized == [2]
    rows, found = model.index.rows_of(torch.tensor([7 * 10**6, 7 * 10**6 + 1]))
    assert bool(found.all()) and rows.tolist() == [rows_before, rows_before + 1]  # one row space: main, then fresh
    assert torch.equal(model.index.table_rows(rows), model.items.rows_for(vectors))  # the cache row lives in that row
    expr = "genre:new OR year >= 1990"
    filter_module.parse.cache_clear()  # count real parses, not the cache's answers
    model.check_filter(expr)  # the service's check
    explain = model.index.search(torch.randn(2, D), k=10, filter=expr, explain=True).explain
    model(model.inputs([[]]), filter=expr, k=10)
    assert len(parsed) == 1 and {"fresh_items": 2, "plan": "exact"} in explain  # the fresh rows were searched
