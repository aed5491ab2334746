"""The synthetic served-model snapshot of the serving load test, on 3,000 items: it loads as a
published model, answers the request mix exactly with respect to each filter (checked by a
plain-Python evaluation over the index's attribute dicts), and is deterministic by seed."""

import json
import operator
from collections import Counter

import pytest
import torch

from sterling.data.synth import CATEGORIES, LANGUAGES, REGIONS
from sterling.index.filter import And, Compare, Not, Or, Term, parse
from sterling.models.overarch import MoLOverArch
from sterling.retrieval.publish import load_model
from sterling.snapshot import read_snapshot
from sterling.testing.snapshots import TAGS, build_serving_snapshot, request_mix

N = 3_000
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "=": operator.eq, "!=": operator.ne}


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return build_serving_snapshot(tmp_path_factory.mktemp("serve") / "snap", num_items=N, seed=3)


@pytest.fixture(scope="module")
def model(snapshot):
    return load_model(snapshot)


@pytest.fixture(scope="module")
def catalogue(model):
    """The index's external ids ``[N]`` and their attribute dicts."""
    ids = model.index.ids
    return ids.tolist(), model.index.attributes_of(ids)


def passes(node, item: dict) -> bool:
    """Whether the attribute dict ``item`` passes the parsed filter ``node``."""
    if isinstance(node, Not):
        return not passes(node.child, item)
    if isinstance(node, (And, Or)):
        return (all if isinstance(node, And) else any)(passes(c, item) for c in node.children)
    value = item.get(node.feature)
    held = [] if value is None else value if isinstance(value, list) else [value]
    if isinstance(node, Compare):
        return bool(held) and OPS[node.op](held[0], node.number)
    wanted = {str(v) for v in ([node.value] if isinstance(node, Term) else node.values)}
    return any(str(v) in wanted for v in held)


def test_the_snapshot_is_a_published_model_of_the_demo_towers(model):
    assert len(model.index) == N and model.dim == 64 and model.static_tensors()["cache"].dtype == torch.float16
    assert model.config.tasks == ("click", "like", "share") and model.config.k0 == 200 and model.config.nprobe == 32
    assert model.config.features == ("surface", "hour", "age_bucket", "country")
    assert isinstance(model.overarch, MoLOverArch) and model.values.configured is not None
    assert model.meta["towers"]["num_items"] == N and model.meta["source"] == {
        "synthetic": {"num_items": N, "dim": 64, "seed": 3, "model_seed": None}
    }


def test_the_attributes_use_the_synthetic_vocabulary(catalogue):
    _, attributes = catalogue
    assert all(set(a) == {"category", "tags", "language", "region", "creator", "year", "kids"} for a in attributes)
    assert {a["category"] for a in attributes} <= set(CATEGORIES)
    assert all(1 <= len(a["tags"]) <= 4 and set(a["tags"]) <= set(TAGS) for a in attributes)
    assert all(1 <= len(a["region"]) <= 3 and set(a["region"]) <= set(REGIONS) for a in attributes)
    assert all(1950 <= a["year"] <= 2025 and a["kids"] in (0, 1) and a["creator"] >= 1000 for a in attributes)
    languages = Counter(a["language"] for a in attributes)
    assert set(languages) <= set(LANGUAGES) and languages.most_common(1)[0][0] == "en"
    own = sum(t.startswith(a["category"] + "-") for a in attributes for t in a["tags"])
    assert own > 0.6 * sum(len(a["tags"]) for a in attributes)  # mostly the category's own tags
    assert 0.02 < sum(a["kids"] for a in attributes) / N < 0.3


def test_the_embeddings_cluster_by_category(model, catalogue):
    ids, attributes = catalogue
    x = torch.nn.functional.normalize(model.index.embeddings_of(ids), dim=-1)
    same = torch.tensor([[a["category"] == b["category"] for b in attributes[:300]] for a in attributes[:300]])
    cos = x[:300] @ x[:300].T
    assert cos[same].mean() > cos[~same].mean() + 0.3


def test_the_request_mix_is_answerable(model, catalogue, snapshot):
    ids, _ = catalogue
    requests = request_mix(model, 500, seed=1)
    known = set(ids)
    for r in requests:
        assert set(r) == {"history", "filter", "k"}
        assert 10 <= len(r["history"]) <= 100 and set(r["history"]) <= known
        assert r["k"] in (10, 20, 50, 100)
    model.inputs([r["history"] for r in requests])  # every history id is in the index
    model.plan(len(requests), [r["filter"] for r in requests])  # every filter parses over the index's features
    kinds = Counter(
        "none" if r["filter"] is None else r["filter"].split(":")[0].split()[0].strip("(") for r in requests
    )
    assert {"none", "category", "tags", "year", "language", "creator"} == set(kinds)
    assert 0.22 < kinds["none"] / len(requests) < 0.38 and kinds["creator"] < 0.04 * len(requests)
    assert request_mix(snapshot, 500, seed=1) == requests != request_mix(model, 500, seed=2)


def test_recommendations_pass_their_filters(model, catalogue):
    ids, attributes = catalogue
    for r in request_mix(model, 40, seed=4):
        out = model.recommend(r["history"], filter=r["filter"], k=r["k"])
        found = [i for i in out.ids[0].tolist() if i >= 0]
        tree = None if r["filter"] is None else parse(r["filter"])
        passing = sum(tree is None or passes(tree, a) for a in attributes)
        assert len(found) == len(set(found)) == min(r["k"], passing)
        assert tree is None or all(passes(tree, a) for a in model.index.attributes_of(found))
        assert (out.scores[0, : len(found)].diff() <= 0).all()


def test_the_build_is_deterministic_by_seed(tmp_path):
    def build(seed: int, name: str) -> dict:
        manifest = json.loads(
            (build_serving_snapshot(tmp_path / name, num_items=500, seed=seed) / "manifest.json").read_text()
        )
        return {"files": manifest["files"], "meta": manifest["meta"]}

    assert build(7, "a") == build(7, "b") != build(8, "c")


def test_a_model_seed_changes_the_weights_not_the_catalogue(tmp_path):
    a = read_snapshot(build_serving_snapshot(tmp_path / "a", num_items=500, seed=7))
    b = read_snapshot(build_serving_snapshot(tmp_path / "b", num_items=500, seed=7, model_seed=9))
    assert torch.equal(a.tensors["index"]["ids"], b.tensors["index"]["ids"])
    assert a.meta["index"] == b.meta["index"]
    assert not torch.equal(
        a.tensors["model"]["task_queries.proj.weight"], b.tensors["model"]["task_queries.proj.weight"]
    )
