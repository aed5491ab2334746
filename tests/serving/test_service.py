"""The service behind the server: the hot swap's update log (applying it merged equals applying every
update in order) and the swapped-out model being freed."""

import random
import sys
from pathlib import Path

import pytest
import torch

from sterling.serving.update_log import Update

sys.path.insert(0, str(Path(__file__).parents[1] / "retrieval"))  # collected before or after tests/retrieval
from test_model import D, compose  # noqa: E402


def random_updates(rng: random.Random, known: list[int], n: int, dim: int = D) -> list[Update]:
    pool = known[:20] + list(range(10**9, 10**9 + 15))  # catalogue items and new ones, often repeated
    out = []
    for _ in range(n):
        ids = rng.sample(pool, rng.randint(0, 4))
        deletes = rng.sample(pool, rng.randint(0, 3))
        attrs = [{"genre": [rng.choice(["drama", "war", "new"])], "year": rng.randint(1980, 2020)} for _ in ids]
        out.append(Update(ids, torch.randn(len(ids), dim), attrs, deletes))
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
    import gc
    import weakref

    from sterling.serving.service import Service
    from sterling.testing.snapshots import build_serving_snapshot

    a = build_serving_snapshot(tmp_path / "a", num_items=500, seed=1, k0=50)
    b = build_serving_snapshot(tmp_path / "b", num_items=500, seed=1, model_seed=2, k0=50)
    service = Service(a, freeze_gc=True)
    try:
        old = weakref.ref(service.model)
        asyncio.run(service.reload(b))
        assert old() is None  # no reference cycle keeps it: the frozen GC would never collect one
    finally:
        service.close()
        gc.unfreeze()


def test_updates_survive_swaps_compactions_and_a_restart(tmp_path):
    """Updates interleaved with swaps to another snapshot, compactions and a swap back to a
    published snapshot after a compaction (served with the updates the compacted one carries):
    each item's last operation holds throughout, and a service started again on the first
    snapshot with the same log serves the same items."""
    import asyncio

    from sterling.serving.service import Service
    from sterling.serving.update_log import UpdateLog
    from sterling.testing.snapshots import build_serving_snapshot

    a = build_serving_snapshot(tmp_path / "a", num_items=500, seed=1, k0=50)
    b = build_serving_snapshot(tmp_path / "b", num_items=500, seed=1, model_seed=2, k0=50)
    log = UpdateLog(tmp_path / "a.updates.sqlite")
    service = Service(a, update_log=log)
    rng = random.Random(0)
    live: dict[int, int] = {}

    async def scenario():
        for step in range(30):
            item = 10**9 + rng.randrange(8)  # few ids, many updates each
            if rng.random() < 0.3 and item in live:
                await service.update(Update([], torch.zeros(0, 64), [], [item]))
                del live[item]
            else:
                live[item] = 5000 + step
                vector = torch.nn.functional.normalize(torch.randn(1, 64), dim=1)
                await service.update(Update([item], vector, [{"creator": live[item]}], []))
            if step in (8, 20):
                await service.reload(b if step == 8 else a)
            if step in (12, 25):
                done = await service.compact()
                assert done["compacted"] and service.info.path == done["snapshot"]
                assert service.model.size().fresh_items == 0  # folded into the IVF lists
                assert log.entries() == [] and log.base == (Path(done["snapshot"]), done["seq"])

    def check(model) -> None:
        for item in range(10**9, 10**9 + 8):
            if item in live:
                got = model.recommend([], filter=f"creator:{live[item]}", k=5).ids[0].tolist()
                assert got[0] == item and got[1:] == [-1] * 4
        assert {i for i in model.index.ids.tolist() if i >= 10**9} == set(live)

    try:
        asyncio.run(scenario())
        check(service.model)
        assert service.describe()["updates_applied"] == 30
        assert service.describe()["update_log"]["applied_seq"] == 30
    finally:
        service.close()
    again = Service(a, update_log=log)  # the snapshot it was first started on: the log's base carries the rest
    try:
        check(again.model)
    finally:
        again.close()
        log.close()
