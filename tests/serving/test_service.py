"""The service behind the server: the hot swap's update log (applying it merged equals applying every
update in order) and the swapped-out model being freed."""

import random

import pytest
import torch
from test_model import D, compose

from sterling.serving.service import Update


def random_updates(rng: random.Random, known: list[int], n: int) -> list[Update]:
    pool = known[:20] + list(range(10**9, 10**9 + 15))  # catalogue items and new ones, often repeated
    out = []
    for _ in range(n):
        ids = rng.sample(pool, rng.randint(0, 4))
        deletes = rng.sample(pool, rng.randint(0, 3))
        attrs = [{"genre": [rng.choice(["drama", "war", "new"])], "year": rng.randint(1980, 2020)} for _ in ids]
        out.append(Update(ids, torch.randn(len(ids), D), attrs, deletes))
    return out


def state(model) -> dict:
    ids = sorted(model.index.ids.tolist())
    return {"ids": ids, "emb": model.index.embeddings_of(ids), "attrs": model.index.attributes_of(ids)}


@pytest.mark.parametrize("seed", range(6))
def test_the_merged_log_has_the_effect_of_the_updates_in_order(seed):
    rng = random.Random(seed)
    one, _, ids = compose(None, k0=20, seed=seed)
    other, _, _ = compose(None, k0=20, seed=seed)
    updates = random_updates(rng, ids.tolist(), rng.randint(1, 12))
    for u in updates:
        u.apply(one)
    Update.merged(updates).apply(other)
    a, b = state(one), state(other)
    assert a["ids"] == b["ids"] and a["attrs"] == b["attrs"]
    assert torch.equal(a["emb"], b["emb"])
    history = [[i for i in ids.tolist()[:5]] + [10**9]] if 10**9 in a["ids"] else [ids.tolist()[:5]]
    assert torch.equal(one(one.inputs(history), k=20).ids, other(other.inputs(history), k=20).ids)


def test_an_empty_log_merges_to_nothing():
    merged = Update.merged([])
    assert merged.ids == [] and merged.deletes == [] and merged.embeddings.shape[0] == 0


def test_a_swapped_out_model_is_freed(tmp_path):
    import asyncio
    import weakref

    from sterling.bench.serve_snapshot import build_serving_snapshot
    from sterling.serving.service import Service

    a = build_serving_snapshot(tmp_path / "a", num_items=500, seed=1, k0=50)
    b = build_serving_snapshot(tmp_path / "b", num_items=500, seed=1, model_seed=2, k0=50)
    service = Service(a)
    try:
        old = weakref.ref(service.model)
        asyncio.run(service.reload(b))
        assert old() is None  # no reference cycle keeps it (the server freezes the GC's view of live objects)
    finally:
        service.close()
