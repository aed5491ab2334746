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
from sterling.retrieval.config import ServingConfig
from sterling.retrieval.item_table import cache_rows
from sterling.retrieval.model import RetrievalModel

TASKS = ("click", "like", "share")
N, D, NLIST = 600, 16, 8
GENRES = ("drama", "comedy", "war", "noir")
FILTERS = [
    None,
    "genre:drama",
    "genre:war AND year >= 2005",
    "NOT genre:comedy",
    "genre IN (noir, war) AND year < 1995",
    "year = 1990",
    "genre:nothing",
]


def world(seed: int = 0, config: IndexConfig | None = None):
    """A random catalogue with attributes, its index and float embeddings (segment order too)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, D, generator=gen)
    emb = torch.nn.functional.normalize(
        centres[torch.randint(10, (N,), generator=gen)] + 0.4 * torch.randn(N, D, generator=gen), dim=-1
    )
    rng = random.Random(seed)
    attrs = [{"genre": rng.sample(GENRES, rng.randint(1, 2)), "year": rng.randint(1980, 2020)} for _ in range(N)]
    ids = torch.randperm(10 * N, generator=gen)[:N] + 7
    index = ItemIndex.build(emb, attrs, ids=ids, config=config or IndexConfig(nlist=NLIST, nprobe=2))
    return emb, attrs, ids, index


def compose(
    kind: str | None,
    k0: int = 40,
    nprobe: int | None = None,
    formula: str | None = None,
    seed: int = 0,
    config: IndexConfig | None = None,
):
    emb, attrs, ids, index = world(seed, config)
    torch.manual_seed(seed)
    towers = TwoTowerConfig(
        num_items=N, num_terms=1, tasks=TASKS, context_features=("surface",), dim=D, hidden=16, max_history=12
    )
    user, queries = UserTower(towers), TaskQueries(D, len(TASKS))
    torch.nn.init.normal_(queries.proj.weight, std=0.3)  # distinct queries per task
    overarch = (
        None
        if kind is None
        else make_overarch(
            OverArchConfig(kind=kind, dim=D, num_tasks=len(TASKS), hidden=16, components=3, component_dim=8)
        )
    )
    segment_ids = index.executor_tensors()["ids"]
    position = {int(i): r for r, i in enumerate(ids.tolist())}
    cache = cache_rows(emb[[position[int(i)] for i in segment_ids]], overarch, torch.float16)
    config = ServingConfig(
        tasks=TASKS, features=("surface",), k0=k0, nprobe=nprobe, value_formula=formula, max_history=12
    )
    model = RetrievalModel(user, queries, index, cache, overarch, config).eval()
    return model, attrs, ids


def passes(attrs: dict, flt: str | None) -> bool:
    """A plain evaluation of the FILTERS above."""
    g, y = set(attrs["genre"]), attrs["year"]
    return {
        None: True,
        "genre:drama": "drama" in g,
        "genre:war AND year >= 2005": "war" in g and y >= 2005,
        "NOT genre:comedy": "comedy" not in g,
        "genre IN (noir, war) AND year < 1995": bool(g & {"noir", "war"}) and y < 1995,
        "year = 1990": y == 1990,
        "genre:nothing": False,
    }[flt]


def requests(model: RetrievalModel, rng: random.Random, b: int):
    ids = model.index.ids.tolist()
    histories = [rng.sample(ids, rng.randint(0, 20)) for _ in range(b)]
    features = [{"surface": rng.randint(0, 5)} for _ in range(b)]
    return model.inputs(histories, features=features)


def exact_candidates(
    model: RetrievalModel, queries: torch.Tensor, flt: str | None, attrs_of: dict, k0: int
) -> list[int]:
    """Segment rows of the exact filtered top-k0 of each task query of one request, merged."""
    stored = (
        model.index.executor_tensors()["codes"].float() * model.index.executor_tensors()["scales"][:, None]
    )  # [N, D]
    ok = torch.tensor([passes(attrs_of[int(i)], flt) for i in model.index.ids])
    rows = set()
    for q in queries:  # [T, D]
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
    stored = model.index.executor_tensors()["codes"].float() * model.index.executor_tensors()["scales"][:, None]
    for b, flt in enumerate(filters):
        s = stored @ queries[b, 0].detach()  # the primary task
        ok = torch.tensor([passes(attrs_of[int(i)], flt) for i in model.index.ids])
        want = torch.topk(s.masked_fill(~ok, float("-inf")), min(k, N))
        count = min(k, int(ok.sum()))
        assert out.ids[b, :count].tolist() == model.index.ids[want.indices[:count]].tolist()
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
            probs = torch.sigmoid(
                model.overarch(
                    users[b : b + 1],
                    queries[b : b + 1],
                    history[b : b + 1],
                    mask[b : b + 1],
                    model.static_tensors()["cache"][rows][None].float(),
                )
            )[0]  # [M, T]
            value = probs[:, 0] if vm is None else vm(probs)
            top = torch.topk(value, min(k, len(rows)))
            count = len(top.values)
            assert out.ids[b, :count].tolist() == model.index.ids[rows[top.indices]].tolist()
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


@pytest.mark.parametrize("kind", ["mlp", "mol"])
def test_rank_from_the_cache_equals_recomputing_the_item_side(kind):
    """rank gathers the cached item state; recomputing it from the item embeddings (rounded to the
    cache dtype, the state rounded again) gives identical scores."""
    model, _, ids = compose(kind, seed=2)
    emb, _, _, _ = world(2)
    inputs = requests(model, random.Random(1), 2)
    gen = torch.Generator().manual_seed(0)
    catalogue_rows = torch.randint(N, (2, 7), generator=gen)  # positions in the catalogue order
    items = ids[catalogue_rows]  # external ids
    cached = model.rank(inputs, items)  # [2, 7, T]
    with torch.no_grad():
        state = model.overarch.item_state(emb.to(torch.float16).float()).to(torch.float16).float()  # [N, S]
        users, queries = model.encode(inputs)
        history, mask = model.history(inputs)
        want = torch.sigmoid(model.overarch(users, queries, history, mask, state[catalogue_rows]))
    assert cached.shape == (2, 7, len(TASKS)) and cached.dtype == torch.float32
    assert torch.equal(cached, want)
    # the user side reads the history through the cache too: the fp16-rounded embeddings
    history_positions = [int((ids == i).nonzero()) for i in model.index.ids[inputs.history_rows]]
    with torch.no_grad():
        plain_users = model.user_tower(
            emb.to(torch.float16).float()[history_positions],
            inputs.history_actions,
            inputs.history_offsets,
            {"surface": inputs.features[:, 0]},
        )
    torch.testing.assert_close(users, plain_users, rtol=0, atol=1e-6)


def test_rank_without_overarch_is_the_inner_product_with_the_stored_vectors():
    model, _, ids = compose(None, seed=4)
    inputs = requests(model, random.Random(3), 3)
    items = ids[torch.randint(N, (3, 5), generator=torch.Generator().manual_seed(1))]
    got = model.rank(inputs, items)  # [3, 5, T]
    tensors = model.index.executor_tensors()
    row = {int(i): r for r, i in enumerate(tensors["ids"].tolist())}
    stored = tensors["codes"].float() * tensors["scales"][:, None]
    with torch.no_grad():
        _, queries = model.encode(inputs)
    for b in range(3):
        vectors = stored[[row[int(i)] for i in items[b]]]  # [5, D]
        torch.testing.assert_close(got[b], vectors @ queries[b].T, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown item ids \\[5\\]"):
        model.rank(inputs, torch.tensor([[int(ids[0])], [int(ids[1])], [5]]))


def test_bad_input_is_refused_with_a_clear_error():
    model, _, _ = compose("mlp", k0=20)
    known = int(model.index.ids[0])
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
        RetrievalModel(
            model.user_tower, model.task_queries, model.index, model.static_tensors()["cache"][:-1], None, model.config
        )
    with pytest.raises(ValueError, match="primary task 'views'"):
        ServingConfig(tasks=TASKS, primary_task="views")


def test_empty_and_long_histories():
    model, _, _ = compose("mol", k0=20)
    ids = model.index.ids.tolist()
    inputs = model.inputs([[], ids[:50]])  # the long one keeps its latest max_history = 12 events
    assert inputs.history_offsets.tolist() == [0, 0, 12]
    assert model.rows_of(torch.tensor(ids[38:50])).tolist() == inputs.history_rows.tolist()
    out = model(inputs, k=5)
    assert torch.isfinite(out.scores).all() and (out.ids >= 0).all()


def test_non_finite_value_model_scores_keep_their_items():
    """A formula may give NaN or ±inf; every candidate still fills a slot, ranked NaN last."""
    model, attrs, ids = compose("mlp", k0=20, nprobe=NLIST, formula="log(click - 0.5)", seed=3)
    inputs = model.inputs([model.index.ids[:5].tolist()])
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


def test_the_index_keeps_the_item_table_in_step():
    """The model's item state lives in the index beside the rows: an upsert straight into the
    index without the items' table rows is refused and changes nothing; the exported path and a
    new model need a compacted index."""
    model, _, _ = compose(None, k0=20)
    item = [{"genre": ["drama"], "year": 2000}]
    with pytest.raises(ValueError, match="item table"):
        model.index.upsert(torch.tensor([10**9]), torch.randn(1, D), item)
    assert model.index.fresh_items == 0 and not bool(model.index.rows_of(torch.tensor([10**9]))[1])
    model.upsert(torch.tensor([10**9]), torch.randn(1, D), item)
    with pytest.raises(ValueError, match="compact"):
        model.plan(1, None)
    cache = model.index.table_rows(torch.arange(len(model.index)))
    with pytest.raises(ValueError, match="1 fresh items"):
        RetrievalModel(model.user_tower, model.task_queries, model.index, cache, None, model.config)


def test_rank_and_inputs_check_types_and_shapes():
    model, _, _ = compose("mol", k0=20)
    inputs = model.inputs([[int(model.index.ids[0])], []])
    assert model.rank(inputs, model.index.ids[:6].view(2, 3)).shape == (2, 3, len(TASKS))
    for bad in (model.index.ids[:3], model.index.ids[:6].view(3, 2), model.index.ids[:6].view(2, 3).float()):
        with pytest.raises(ValueError, match="item_ids must be integer"):
            model.rank(inputs, bad)
    with pytest.raises(ValueError, match="history item ids must be 64-bit integers, got 1.5"):
        model.inputs([[1.5]])
    with pytest.raises(ValueError, match="features must be 64-bit integers"):
        model.inputs([[]], features=[{"surface": 2.7}])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"nprobe": 0}, "nprobe must be None or an int >= 1"),
        ({"k0": 0}, "k0 must be an int >= 1"),
        ({"max_history": 0}, "max_history"),
        ({"tasks": ()}, "tasks must be"),
        ({"tasks": ("a", "a")}, "tasks must be"),
        ({"value_formula": "clik + 1"}, "unknown task 'clik'"),
        ({"retrieval_temperature": 0.0}, "retrieval_temperature must be None or a finite number > 0"),
        ({"retrieval_temperature": float("nan")}, "retrieval_temperature must be None or a finite number > 0"),
        ({"retrieval_temperature": True}, "retrieval_temperature must be None or a finite number > 0"),
    ],
)
def test_serving_config_is_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServingConfig(**{"tasks": TASKS, **kwargs})


# ---- random filters with a plain-Python predicate ------------------------------------------------


def random_filter(rng: random.Random, depth: int = 0):
    """A random filter over ``genre`` / ``year`` and its plain evaluation ``attrs -> bool``."""
    kind = rng.choice(
        ["genre", "in", "ge", "lt", "eq", "and", "or", "not"] if depth < 2 else ["genre", "ge", "lt", "eq"]
    )
    if kind == "genre":
        g = rng.choice(GENRES + ("nothing",))
        return f"genre:{g}", lambda a: g in a["genre"]
    if kind == "in":
        gs = rng.sample(GENRES, 2)
        return f"genre IN ({gs[0]}, {gs[1]})", lambda a: bool(set(gs) & set(a["genre"]))
    y = rng.randint(1978, 2022)
    if kind == "ge":
        return f"year >= {y}", lambda a: a["year"] >= y
    if kind == "lt":
        return f"year < {y}", lambda a: a["year"] < y
    if kind == "eq":
        return f"year = {y}", lambda a: a["year"] == y
    if kind == "not":
        text, f = random_filter(rng, depth + 1)
        return f"NOT ({text})", lambda a: not f(a)
    (lt, lf), (rt, rf) = random_filter(rng, depth + 1), random_filter(rng, depth + 1)
    if kind == "and":
        return f"({lt}) AND ({rt})", lambda a: lf(a) and rf(a)
    return f"({lt}) OR ({rt})", lambda a: lf(a) or rf(a)


_COMPOSED: dict = {}  # composed models shared by hypothesis examples (composition is deterministic)


def composed(key, **kwargs):
    """``compose(**kwargs)[:3]``, built once per key."""
    if key not in _COMPOSED:
        _COMPOSED[key] = compose(**kwargs)[:3]
    return _COMPOSED[key]


def exact_top(model: RetrievalModel, query: torch.Tensor, ok: torch.Tensor, k: int) -> tuple[list[int], torch.Tensor]:
    """External ids and scores of the exact top-k passing items by inner product with the index's
    stored vectors (from ``executor_tensors``, independent of the model's buffers)."""
    tensors = model.index.executor_tensors()
    stored = tensors["codes"].float() * tensors["scales"][:, None]
    s = (stored @ query).masked_fill(~ok, float("-inf"))
    top = torch.topk(s, min(k, len(s)))
    count = min(k, int(ok.sum()))
    return tensors["ids"][top.indices[:count]].tolist(), top.values[:count]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**20),
    b=st.integers(1, 4),
    k=st.integers(1, 50),
    nprobe=st.sampled_from([NLIST, NLIST + 3, 100]),
    shared=st.booleans(),
)
def test_exact_filtered_top_k_under_random_filters(seed, b, k, nprobe, shared):
    """Random filter trees (one for all requests, or one each), nprobe >= nlist: the exact filtered
    top-k of the primary task's query, padded with -1 / -inf."""
    model, attrs, ids = composed(("exact", nprobe), kind=None, k0=50, nprobe=nprobe, seed=7)
    attrs_of = dict(zip(ids.tolist(), attrs))
    rng = random.Random(seed)
    drawn = [random_filter(rng) for _ in range(1 if shared else b)]
    inputs = requests(model, rng, b)
    out = model(inputs, filter=drawn[0][0] if shared else [t for t, _ in drawn], k=k)
    assert out.ids.shape == (b, k) and out.scores.shape == (b, k) and out.task_scores.shape == (b, k, len(TASKS))
    with torch.no_grad():
        _, queries = model.encode(inputs)
    segment_ids = model.index.executor_tensors()["ids"]
    for r in range(b):
        predicate = drawn[0 if shared else r][1]
        ok = torch.tensor([predicate(attrs_of[int(i)]) for i in segment_ids])
        want_ids, want_scores = exact_top(model, queries[r, model.config.primary], ok, k)
        count = len(want_ids)
        assert out.ids[r, :count].tolist() == want_ids
        torch.testing.assert_close(out.scores[r, :count], want_scores, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.task_scores[r, :count, model.config.primary], want_scores, rtol=1e-5, atol=1e-5)
        assert (out.ids[r, count:] == -1).all() and torch.isneginf(out.scores[r, count:]).all()
        assert (out.task_scores[r, count:] == 0).all()


def test_k0_beyond_the_catalogue_pads_the_tail():
    """k0 > N: every passing item is returned once, the rest is -1 / -inf, exact order."""
    model, attrs, ids = compose(None, k0=N + 50, nprobe=NLIST)
    attrs_of = dict(zip(ids.tolist(), attrs))
    inputs = requests(model, random.Random(11), 2)
    out = model(inputs, filter=[None, "year < 1990"], k=N + 20)
    with torch.no_grad():
        _, queries = model.encode(inputs)
    segment_ids = model.index.executor_tensors()["ids"]
    for r, flt in enumerate([None, "year < 1990"]):
        ok = torch.tensor(
            [passes(attrs_of[int(i)], flt) if flt is None else attrs_of[int(i)]["year"] < 1990 for i in segment_ids]
        )
        want_ids, want_scores = exact_top(model, queries[r, 0], ok, N + 20)
        assert out.ids[r, : len(want_ids)].tolist() == want_ids
        assert (out.ids[r, len(want_ids) :] == -1).all() and torch.isneginf(out.scores[r, len(want_ids) :]).all()
    assert (out.ids[0] >= 0).sum() == N and len(set(out.ids[0].tolist())) == N + 1  # N items and -1


@pytest.mark.parametrize("kind", [None, "mlp", "mol"])
def test_the_value_model_ranks_by_its_formula_of_the_task_scores(kind):
    k0, k = 25, 15
    formula = "click + 0.5*like"
    model, attrs, ids = compose(kind, k0=k0, nprobe=NLIST, formula=formula, seed=6)
    attrs_of = dict(zip(ids.tolist(), attrs))
    filters = [None, "NOT genre:comedy", "genre:war AND year >= 2005"]
    inputs = requests(model, random.Random(2), len(filters))
    out = model(inputs, filter=filters, k=k)
    valid = out.ids >= 0
    click, like = out.task_scores[..., 0], out.task_scores[..., 1]
    torch.testing.assert_close(out.scores[valid], (click + 0.5 * like)[valid], rtol=1e-5, atol=1e-6)
    for r in range(len(filters)):
        s = out.scores[r][valid[r]]
        assert (s.diff() <= 0).all()
    if kind is None:  # the formula over the exact candidate set's inner products
        with torch.no_grad():
            _, queries = model.encode(inputs)
        for r, flt in enumerate(filters):
            rows = torch.tensor(exact_candidates(model, queries[r], flt, attrs_of, k0), dtype=torch.int64)
            stored = (
                model.index.executor_tensors()["codes"][rows].float()
                * model.index.executor_tensors()["scales"][rows][:, None]
            )
            per_task = stored @ queries[r].T  # [M, T]
            value = per_task[:, 0] + 0.5 * per_task[:, 1]
            top = torch.topk(value, min(k, len(rows)))
            assert out.ids[r, : len(top.values)].tolist() == model.index.ids[rows[top.indices]].tolist()
            torch.testing.assert_close(out.scores[r, : len(top.values)], top.values, rtol=1e-5, atol=1e-5)
    else:  # the task scores are probabilities
        assert ((out.task_scores[valid] > 0) & (out.task_scores[valid] < 1)).all()


@pytest.mark.parametrize("kind", [None, "mol"])
def test_an_item_retrieved_by_several_task_queries_appears_once(kind):
    """With the task heads at their initial zero residual every task query is the user embedding:
    the T lists are the same K0 items, merged to K0 distinct candidates."""
    k0 = 30
    model, attrs, ids = compose(kind, k0=k0, nprobe=NLIST, seed=8)
    torch.nn.init.zeros_(model.task_queries.proj.weight)
    torch.nn.init.zeros_(model.task_queries.proj.bias)
    attrs_of = dict(zip(ids.tolist(), attrs))
    filters = ["genre:drama", None]
    inputs = requests(model, random.Random(4), 2)
    with torch.no_grad():
        _, queries = model.encode(inputs)
    assert torch.equal(queries[:, 0], queries[:, 1]) and torch.equal(queries[:, 0], queries[:, 2])
    out = model(inputs, filter=filters, k=k0)
    plan = model.plan(2, filters)
    with torch.no_grad():
        tensor_only = model.execute(inputs, plan.probes, plan.allowed, k0)
    segment_ids = model.index.executor_tensors()["ids"]
    for r, flt in enumerate(filters):
        ok = torch.tensor([passes(attrs_of[int(i)], flt) for i in segment_ids])
        want_ids, _ = exact_top(model, queries[r, 0], ok, k0)
        got = out.ids[r].tolist()
        assert len(set(got)) == k0 and -1 not in got  # k0 distinct items fill k0 slots
        assert set(got) == set(want_ids)
        assert tensor_only.ids[r].tolist() == got
        if kind is None:
            assert got == want_ids


def test_history_holds_the_latest_events_of_each_request():
    model, _, _ = compose("mol", k0=20)  # max_history = 12
    rng = random.Random(9)
    all_ids = model.index.ids.tolist()
    histories = [rng.sample(all_ids, n) for n in (0, 1, 12, 13, 30, 5)]
    actions = [[rng.randint(0, 9) for _ in h] for h in histories]
    inputs = model.inputs(histories, actions)
    assert inputs.history_actions.tolist() == [x for a in actions for x in a[-12:]]  # the latest events' actions
    history, mask = model.history(inputs)
    assert history.shape == (6, 12, D) and mask.shape == (6, 12)
    for r, h in enumerate(histories):
        latest = h[-12:]
        assert int(mask[r].sum()) == len(latest)
        assert (history[r][~mask[r]] == 0).all()
        rows = model.rows_of(torch.tensor(latest, dtype=torch.int64))
        want = model.static_tensors()["cache"][rows, :D].float()
        assert torch.equal(history[r][mask[r]], want)  # oldest first
    with pytest.raises(ValueError, match="2 histories, 1 action lists"):
        model.inputs([[], []], actions=[[]])


# 16 lists of ~37 items and a planner asking for few candidates: nprobe 1 or 3 probes 1 or 3 lists
# (widened only where a filter leaves fewer than k0 items in them), so the search is approximate
PARTIAL = IndexConfig(nlist=16, nprobe=1, min_candidates=1.0)


def test_the_partial_probing_index_is_approximate():
    """The index of the next test really probes fewer than all lists, and misses exact results."""
    model, attrs, ids = compose(None, k0=20, nprobe=1, seed=5, config=PARTIAL)
    plan = model.plan(8, None)
    assert (plan.probes < 16).all()
    inputs = requests(model, random.Random(0), 8)
    out = model(inputs, k=20)
    with torch.no_grad():
        _, queries = model.encode(inputs)
    ok = torch.ones(N, dtype=torch.bool)
    misses = sum(set(out.ids[r].tolist()) != set(exact_top(model, queries[r, 0], ok, 20)[0]) for r in range(8))
    assert misses > 0


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**20),
    kind=st.sampled_from([None, "mlp", "mol"]),
    nprobe=st.sampled_from([1, 3]),
    shared=st.booleans(),
)
def test_execute_answers_like_forward_under_random_filters(seed, kind, nprobe, shared):
    """The tensor-only path (plan + execute) against the eager fused path, nprobe < nlist, random
    filter trees (one string for all requests or one each), histories possibly empty."""
    model, _, _ = composed(("execute", kind, nprobe), kind=kind, k0=20, nprobe=nprobe, seed=5, config=PARTIAL)
    rng = random.Random(seed)
    b = rng.randint(1, 4)
    flt = random_filter(rng)[0] if shared else [random_filter(rng)[0] if rng.random() < 0.8 else None for _ in range(b)]
    inputs = requests(model, rng, b)
    k = rng.randint(1, 20)
    eager = model(inputs, filter=flt, k=k)
    plan = model.plan(b, flt)
    assert plan.probes.shape == (b * len(TASKS),) and plan.allowed.shape == (b * len(TASKS), (N + 63) // 64)
    with torch.no_grad():
        tensor_only = model.execute(inputs, plan.probes, plan.allowed, k)
    assert torch.equal(tensor_only.ids, eager.ids)
    torch.testing.assert_close(tensor_only.scores, eager.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tensor_only.task_scores, eager.task_scores, rtol=1e-5, atol=1e-5)


def test_more_bad_input():
    model, _, ids = compose(None, k0=20)
    inputs = model.inputs([[int(model.index.ids[0])], []])
    with pytest.raises(ValueError, match="1 filters for 2 requests"):
        model.plan(2, ["genre:drama"])
    with pytest.raises(ValueError, match="1 filters for 2 requests"):
        model(inputs, filter=["genre:drama"], k=3)
    with pytest.raises(FilterError) as err:
        model(inputs, filter=["genre:drama", "year >= "], k=3)
    assert err.value.position == len("year >= ")
    with pytest.raises(ValueError, match="unknown item ids \\[1, 2\\]"):
        model.inputs([[2, int(model.index.ids[0]), 1]])
    with pytest.raises(ValueError, match="k must be an int"):
        model(inputs, k=None)
