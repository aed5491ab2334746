"""RetrievalModel end to end on a small random model: without OverArch and probing every list it is
the exact filtered top-k by inner product; with OverArch it is OverArch applied to the exact
candidate set; the tensor-only ``execute`` answers like the eager ``forward``; bad input is refused."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sterling import IndexConfig, ItemIndex
from sterling.index.filter import FilterError
from sterling.models.overarch import OverArchConfig, make_overarch
from sterling.models.towers import TaskQueries, TwoTowerConfig, UserTower
from sterling.models.value_model import ValueModel
from sterling.serving.model import RetrievalModel, ServingConfig
from sterling.serving.publish import cache_rows

TASKS = ("click", "like", "share")
N, D, NLIST = 600, 16, 8
GENRES = ("drama", "comedy", "war", "noir")
FILTERS = [None, "genre:drama", "genre:war AND year >= 2005", "NOT genre:comedy", "genre IN (noir, war) AND year < 1995",
           "year = 1990", "genre:nothing"]


def world(seed: int = 0):
    """A random catalogue with attributes, its index and float embeddings (segment order too)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, D, generator=gen)
    emb = torch.nn.functional.normalize(centres[torch.randint(10, (N,), generator=gen)]
                                        + 0.4 * torch.randn(N, D, generator=gen), dim=-1)
    rng = random.Random(seed)
    attrs = [{"genre": rng.sample(GENRES, rng.randint(1, 2)), "year": rng.randint(1980, 2020)} for _ in range(N)]
    ids = torch.randperm(10 * N, generator=gen)[:N] + 7
    index = ItemIndex.build(emb, attrs, ids=ids, config=IndexConfig(nlist=NLIST, nprobe=2))
    return emb, attrs, ids, index


def compose(kind: str | None, k0: int = 40, nprobe: int | None = None, formula: str | None = None, seed: int = 0):
    emb, attrs, ids, index = world(seed)
    torch.manual_seed(seed)
    towers = TwoTowerConfig(num_items=N, num_terms=1, tasks=TASKS, context_features=("surface",), dim=D, hidden=16,
                            max_history=12)
    user, queries = UserTower(towers), TaskQueries(D, len(TASKS))
    torch.nn.init.normal_(queries.proj.weight, std=0.3)  # distinct queries per task
    overarch = None if kind is None else make_overarch(OverArchConfig(kind=kind, dim=D, num_tasks=len(TASKS), hidden=16,
                                                                      components=3, component_dim=8))
    segment_ids = index.executor_tensors()["ids"]
    position = {int(i): r for r, i in enumerate(ids.tolist())}
    cache = cache_rows(emb[[position[int(i)] for i in segment_ids]], overarch, torch.float16)
    config = ServingConfig(tasks=TASKS, features=("surface",), k0=k0, nprobe=nprobe, value_formula=formula,
                           max_history=12)
    model = RetrievalModel(user, queries, index, cache, overarch, config).eval()
    return model, attrs, ids


def passes(attrs: dict, flt: str | None) -> bool:
    """A plain evaluation of the FILTERS above."""
    g, y = set(attrs["genre"]), attrs["year"]
    return {
        None: True, "genre:drama": "drama" in g, "genre:war AND year >= 2005": "war" in g and y >= 2005,
        "NOT genre:comedy": "comedy" not in g, "genre IN (noir, war) AND year < 1995": bool(g & {"noir", "war"}) and y < 1995,
        "year = 1990": y == 1990, "genre:nothing": False,
    }[flt]


def requests(model: RetrievalModel, rng: random.Random, b: int):
    ids = model.ids.tolist()
    histories = [rng.sample(ids, rng.randint(0, 20)) for _ in range(b)]
    features = [{"surface": rng.randint(0, 5)} for _ in range(b)]
    return model.inputs(histories, features=features)


def exact_candidates(model: RetrievalModel, queries: torch.Tensor, flt: str | None, attrs_of: dict, k0: int) -> list[int]:
    """Segment rows of the exact filtered top-k0 of each task query of one request, merged."""
    stored = model.codes.float() * model.scales[:, None]                      # [N, D]
    ok = torch.tensor([passes(attrs_of[int(i)], flt) for i in model.ids])
    rows = set()
    for q in queries:                                                         # [T, D]
        s = (stored @ q).masked_fill(~ok, float("-inf"))
        top = torch.topk(s, min(k0, len(s)))
        rows |= set(top.indices[torch.isfinite(top.values)].tolist())
    return sorted(rows)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), k=st.integers(1, 40))
def test_without_overarch_probing_every_list_is_exact_filtered_top_k(seed, k):
    model, attrs, ids = compose(None, nprobe=NLIST)
    attrs_of = dict(zip(ids.tolist(), attrs))
    rng = random.Random(seed)
    filters = [rng.choice(FILTERS) for _ in range(3)]
    inputs = requests(model, rng, 3)
    out = model(inputs, filter=filters, k=k)
    _, queries = model.encode(inputs)
    stored = model.codes.float() * model.scales[:, None]
    for b, flt in enumerate(filters):
        s = stored @ queries[b, 0].detach()                                   # the primary task
        ok = torch.tensor([passes(attrs_of[int(i)], flt) for i in model.ids])
        want = torch.topk(s.masked_fill(~ok, float("-inf")), min(k, N))
        count = min(k, int(ok.sum()))
        assert out.ids[b, :count].tolist() == model.ids[want.indices[:count]].tolist()
        torch.testing.assert_close(out.scores[b, :count], want.values[:count], rtol=1e-5, atol=1e-5)
        assert (out.ids[b, count:] == -1).all() and torch.isneginf(out.scores[b, count:]).all()
        assert all(passes(attrs_of[i], flt) for i in out.ids[b, :count].tolist())


@pytest.mark.parametrize("kind", ["mlp", "mol"])
@pytest.mark.parametrize("formula", [None, "click + 0.5*like^0.5 + 0.25*share"])
def test_overarch_is_applied_to_the_exact_candidate_set(kind, formula):
    k0, k = 30, 12
    model, attrs, ids = compose(kind, k0=k0, nprobe=NLIST, formula=formula, seed=1)
    attrs_of = dict(zip(ids.tolist(), attrs))
    rng = random.Random(5)
    filters = ["genre:drama", None, "genre:war AND year >= 2005", "genre:nothing"]
    inputs = requests(model, rng, len(filters))
    out = model(inputs, filter=filters, k=k)
    with torch.no_grad():
        users, queries = model.encode(inputs)
        history, mask = model.history(inputs)
        vm = None if formula is None else ValueModel(formula, TASKS)
        for b, flt in enumerate(filters):
            rows = torch.tensor(exact_candidates(model, queries[b], flt, attrs_of, k0), dtype=torch.int64)
            if not len(rows):
                assert (out.ids[b] == -1).all()
                continue
            probs = torch.sigmoid(model.overarch(users[b : b + 1], queries[b : b + 1], history[b : b + 1],
                                                 mask[b : b + 1], model.cache[rows][None].float()))[0]   # [M, T]
            value = probs[:, 0] if vm is None else vm(probs)
            top = torch.topk(value, min(k, len(rows)))
            count = len(top.values)
            assert out.ids[b, :count].tolist() == model.ids[rows[top.indices]].tolist()
            torch.testing.assert_close(out.scores[b, :count], top.values, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out.task_scores[b, :count], probs[top.indices], rtol=1e-5, atol=1e-6)
            if vm is not None:  # the ranking score is the formula of the returned task scores
                torch.testing.assert_close(out.scores[b, :count], vm(out.task_scores[b, :count]), rtol=1e-5, atol=1e-6)
            assert (out.ids[b, count:] == -1).all()
            assert len(set(out.ids[b, :count].tolist())) == count  # merged task lists: each item once


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), kind=st.sampled_from([None, "mlp", "mol"]), nprobe=st.sampled_from([1, 2, NLIST]))
def test_execute_answers_like_forward(seed, kind, nprobe):
    model, _, _ = compose(kind, k0=25, nprobe=nprobe, formula="click + like", seed=seed % 3)
    rng = random.Random(seed)
    b = rng.randint(1, 4)
    filters = [rng.choice(FILTERS) for _ in range(b)]
    inputs = requests(model, rng, b)
    eager = model(inputs, filter=filters, k=10)
    plan = model.plan(b, filters)
    with torch.no_grad():
        tensor_only = model.execute(inputs, plan.probes, plan.allowed, 10)
    assert torch.equal(tensor_only.ids, eager.ids)
    torch.testing.assert_close(tensor_only.scores, eager.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tensor_only.task_scores, eager.task_scores, rtol=1e-5, atol=1e-5)


def test_rank_from_the_cache_equals_recomputing_the_item_side():
    model, _, ids = compose("mol", seed=2)
    emb, _, _, _ = world(2)
    inputs = requests(model, random.Random(1), 2)
    items = model.ids[torch.randint(N, (2, 7), generator=torch.Generator().manual_seed(0))]
    cached = model.rank(inputs, items)                                        # [2, 7, T]
    position = {int(i): r for r, i in enumerate(ids.tolist())}
    vectors = emb[[position[int(i)] for i in items.reshape(-1)]]
    with torch.no_grad():
        state = cache_rows(vectors, model.overarch, torch.float16).float().view(2, 7, -1)
        users, queries = model.encode(inputs)
        history, mask = model.history(inputs)
        want = torch.sigmoid(model.overarch(users, queries, history, mask, state))
    assert cached.shape == (2, 7, len(TASKS)) and torch.equal(cached, want)


def test_bad_input_is_refused_with_a_clear_error():
    model, _, _ = compose("mlp", k0=20)
    known = int(model.ids[0])
    with pytest.raises(ValueError, match="unknown item ids \\[3\\]"):
        model.inputs([[known, 3]])
    with pytest.raises(ValueError, match="unknown features \\['colour'\\]"):
        model.inputs([[known]], features=[{"colour": 1}])
    with pytest.raises(ValueError, match="2 items has 1 actions"):
        model.inputs([[known, known]], actions=[[1]])
    inputs = model.inputs([[known], []])
    for k in (0, 21, True, 2.0):
        with pytest.raises(ValueError, match="k must be an int in \\[1, k0 = 20\\]"):
            model(inputs, k=k)
    with pytest.raises(ValueError, match="3 filters for 2 requests"):
        model(inputs, filter=["genre:drama"] * 3, k=5)
    with pytest.raises(FilterError, match="position"):
        model(inputs, filter="genre:drama AND (year > 2000", k=5)
    with pytest.raises(FilterError, match="colour"):
        model(inputs, filter="colour:red", k=5)
    with pytest.raises(ValueError, match="cache"):
        RetrievalModel(model.user_tower, model.task_queries, model.index, model.cache[:-1], None, model.config)
    with pytest.raises(ValueError, match="primary task 'views'"):
        ServingConfig(tasks=TASKS, primary_task="views")


def test_empty_and_long_histories():
    model, _, _ = compose("mol", k0=20)
    ids = model.ids.tolist()
    inputs = model.inputs([[], ids[:50]])  # the long one keeps its latest max_history = 12 events
    assert inputs.history_offsets.tolist() == [0, 0, 12]
    assert model.rows_of(torch.tensor(ids[38:50])).tolist() == inputs.history_rows.tolist()
    out = model(inputs, k=5)
    assert torch.isfinite(out.scores).all() and (out.ids >= 0).all()


def test_non_finite_value_model_scores_keep_their_items():
    """A formula may give NaN or ±inf; every candidate still fills a slot, ranked NaN last."""
    model, attrs, ids = compose("mlp", k0=20, nprobe=NLIST, formula="log(click - 0.5)", seed=3)
    inputs = model.inputs([model.ids[:5].tolist()])
    out = model(inputs, k=8)
    assert (out.ids >= 0).all()  # 600 passing items: all 8 slots hold one
    scores = out.scores[0]
    finite = torch.isfinite(scores) | torch.isneginf(scores)
    nan = torch.isnan(scores)
    assert bool((finite | nan).all())
    assert not bool((nan[:-1] & ~nan[1:]).any())  # NaN only after every number
    numbers = scores[~nan]
    assert (numbers.diff() <= 0).all()
    torch.testing.assert_close(scores, torch.log(out.task_scores[0, :, 0] - 0.5), equal_nan=True)


def test_an_index_with_fresh_items_or_changed_since_is_refused():
    model, _, _ = compose(None, k0=20)
    inputs = model.inputs([[int(model.ids[0])]])
    model.index.upsert(torch.tensor([10**9]), torch.randn(1, D), [{"genre": ["drama"], "year": 2000}])
    for call in (lambda: model(inputs, k=5), lambda: model.plan(1, None),
                 lambda: model.rank(inputs, model.ids[:3][None])):
        with pytest.raises(ValueError, match="index changed"):
            call()
    with pytest.raises(ValueError, match="1 fresh items"):
        RetrievalModel(model.user_tower, model.task_queries, model.index, model.cache, None, model.config)


def test_rank_and_inputs_check_types_and_shapes():
    model, _, _ = compose("mol", k0=20)
    inputs = model.inputs([[int(model.ids[0])], []])
    assert model.rank(inputs, model.ids[:6].view(2, 3)).shape == (2, 3, len(TASKS))
    for bad in (model.ids[:3], model.ids[:6].view(3, 2), model.ids[:6].view(2, 3).float()):
        with pytest.raises(ValueError, match="item_ids must be integer"):
            model.rank(inputs, bad)
    with pytest.raises(ValueError, match="history item ids must be 64-bit integers, got 1.5"):
        model.inputs([[1.5]])
    with pytest.raises(ValueError, match="features must be 64-bit integers"):
        model.inputs([[]], features=[{"surface": 2.7}])


@pytest.mark.parametrize("kwargs, message", [
    ({"nprobe": 0}, "nprobe must be None or an int >= 1"), ({"k0": 0}, "k0 must be an int >= 1"),
    ({"max_history": 0}, "max_history"), ({"tasks": ()}, "tasks must be"), ({"tasks": ("a", "a")}, "tasks must be"),
    ({"value_formula": "clik + 1"}, "unknown task 'clik'"),
])
def test_serving_config_is_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServingConfig(**{"tasks": TASKS, **kwargs})
