"""Item-sharded serving (sterling.serving.shards) against the single-process model: with every list
probed, the shards' merged answer is the model's, for random histories and filters."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.index.config import IndexConfig
from sterling.retrieval.publish import load_model
from sterling.serving.shards import (
    Behind,
    Candidates,
    LocalReplica,
    ShardedModel,
    ShardSearcher,
    merge_topk,
    shard_digests,
    shard_of,
    shard_paths,
    split_snapshot,
)
from sterling.snapshot import SnapshotError
from sterling.testing.snapshots import build_serving_snapshot

N, NLIST = 2_000, 16
FILTERS = [
    None,
    "category:music",
    "year >= 2015",
    "NOT language:en AND kids:0",
    "tags IN (music-live, gaming-live) OR year < 1990",
    "category:no-such-category",
]


@pytest.fixture(scope="module", params=["mol", None], ids=["overarch", "inner-product"])
def models(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    snapshot = build_serving_snapshot(
        root / "one",
        num_items=N,
        seed=3,
        overarch=request.param,
        k0=40,
        nprobe=NLIST,
        index_config=IndexConfig(nlist=NLIST),
    )
    sharded = split_snapshot(snapshot, root / "sharded", shards=3)
    return load_model(snapshot), ShardedModel.local(sharded), sharded


def test_the_shards_partition_the_items(models):
    single, sharded, path = models
    paths = shard_paths(path)
    shard_ids = [load_model(p).index.ids for p in paths]
    assert len(paths) == 3 and all(len(ids) > N // 4 for ids in shard_ids)
    assert torch.equal(torch.cat(shard_ids).sort().values, single.index.ids.sort().values)
    for s, ids in enumerate(shard_ids):
        assert bool((shard_of(ids, 3) == s).all())


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), batch=st.integers(1, 4), k=st.integers(1, 40), which=st.integers(0, 10_000))
def test_sharded_answers_equal_the_single_model(models, seed, batch, k, which):
    single, sharded, _ = models
    rng = np.random.default_rng(seed)
    ids = single.index.ids.numpy()
    histories = [rng.choice(ids, int(rng.integers(0, 30))).tolist() for _ in range(batch)]
    features = [{"surface": int(rng.integers(0, 4)), "hour": int(rng.integers(0, 24))} for _ in range(batch)]
    filters = [FILTERS[(which + i) % len(FILTERS)] for i in range(batch)]
    want = single(single.inputs(histories, None, features), filter=filters, k=k)
    got = sharded(sharded.inputs(histories, None, features), filter=filters, k=k)
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(
        got.scores, want.scores, rtol=0, atol=0, equal_nan=True
    )  # exact; NaN: like^0.5 of a negative
    torch.testing.assert_close(got.task_scores, want.task_scores, rtol=0, atol=0)


def test_merge_topk_is_the_top_of_the_union():
    gen = torch.Generator().manual_seed(0)
    parts = []
    for s in range(3):
        scores = torch.randn(5, 7, generator=gen).sort(dim=1, descending=True).values
        ids = torch.randint(0, 1000, (5, 7), generator=gen) * 3 + s
        scores[0, 4:], ids[0, 4:] = float("-inf"), -1  # a shard short of candidates
        parts.append(Candidates(ids, scores, torch.stack([ids.float(), scores], -1)))
    merged = merge_topk(parts, 7)
    for q in range(5):
        pool = sorted(
            ((float(p.scores[q, j]), int(p.ids[q, j])) for p in parts for j in range(7)), key=lambda x: -x[0]
        )[:7]
        assert merged.scores[q].tolist() == [s for s, _ in pool] and merged.ids[q].tolist() == [i for _, i in pool]
    assert torch.equal(merged.state[..., 0], merged.ids.float())  # each candidate keeps its own state


def test_bad_sharded_snapshots(models, tmp_path):
    single, sharded, path = models
    with pytest.raises(SnapshotError, match="not a sharded snapshot"):
        ShardedModel.local(tmp_path)
    mixed = tmp_path / "mixed"
    shutil.copytree(path, mixed)
    shutil.rmtree(mixed / "shard-1")
    split_snapshot(path / "shard-0", tmp_path / "other", shards=2)
    shutil.copytree(tmp_path / "other" / "shard-1", mixed / "shard-1")  # a shard of another split
    with pytest.raises(SnapshotError, match="the shards are not one snapshot"):
        ShardedModel.local(mixed)
    with pytest.raises(ValueError, match="unknown item ids \\[-5\\]"):
        sharded.inputs([[-5]])
    with pytest.raises(ValueError, match="k must be an int in \\[1, k0 = 40\\]"):
        sharded(sharded.inputs([[]]), k=41)
    with pytest.raises(ValueError, match="shards must be at least 1"):
        split_snapshot(path / "shard-0", tmp_path / "x", shards=0)


@pytest.mark.parametrize("merge_at", [2, 4096])
def test_updates_through_the_shards_answer_like_the_single_model(tmp_path, monkeypatch, merge_at):
    from sterling.serving.shards import HistoryTable

    monkeypatch.setattr(HistoryTable, "MERGE_AT", merge_at)
    snapshot = build_serving_snapshot(
        tmp_path / "one", num_items=800, seed=4, k0=30, nprobe=8, index_config=IndexConfig(nlist=8)
    )
    single, sharded = load_model(snapshot), ShardedModel.local(split_snapshot(snapshot, tmp_path / "s", shards=3))
    existing = single.index.ids[:2].tolist()
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        ids = torch.tensor([10**9 + step, 10**9 + step + 1, existing[step % 2]])  # new, new again, overwrite
        vectors = torch.nn.functional.normalize(torch.randn(3, single.dim, generator=gen), dim=1)
        attributes = [{"category": "fresh", "year": 2030}] * 3
        for model in (single, sharded):
            model.upsert(ids, vectors, attributes)
    assert single.delete([existing[0], 10**9]) == sharded.delete([existing[0], 10**9]) == 2
    assert sharded.size() == single.size()
    history = [10**9 + 2, existing[1], existing[0], 10**9 + 1] + single.index.ids[5:9].tolist()
    for flt in (None, "category:fresh", "year >= 2030"):
        want = single(single.inputs([history]), filter=flt, k=20)
        got = sharded(sharded.inputs([history]), filter=flt, k=20)
        assert torch.equal(got.ids, want.ids) and torch.equal(got.scores, want.scores)
    item_ids = torch.tensor([[10**9 + 2, existing[1], 10**9 + 1]])
    assert torch.equal(
        sharded.rank(sharded.inputs([history]), item_ids), single.rank(single.inputs([history]), item_ids)
    )


def test_a_shard_without_items_answers_nothing(tmp_path):
    snapshot = build_serving_snapshot(
        tmp_path / "one", num_items=40, seed=6, k0=10, nprobe=2, index_config=IndexConfig(nlist=2)
    )
    single = load_model(snapshot)
    sharded = ShardedModel.local(split_snapshot(snapshot, tmp_path / "s", shards=200))  # most shards hold no item
    history = single.index.ids[:3].tolist()
    want = single(single.inputs([history]), k=10)
    got = sharded(sharded.inputs([history]), k=10)
    assert torch.equal(got.ids, want.ids) and torch.equal(got.scores, want.scores)
    item_ids = torch.tensor([history])
    assert torch.equal(
        sharded.rank(sharded.inputs([history]), item_ids), single.rank(single.inputs([history]), item_ids)
    )


def test_a_bad_upsert_changes_no_shard(models):
    _, sharded, _ = models
    before = sharded.size()
    vectors = torch.zeros(3, sharded.dim)
    for ids, emb, attrs, message in (
        ([2, 1, 1], vectors, [{}] * 3, "distinct"),
        ([2, 3], vectors[:1], [{}] * 2, "embeddings \\[M, 64\\]"),
        ([2, 3, 4], vectors.fill_(float("nan")), [{}] * 3, "finite"),
    ):
        with pytest.raises(ValueError, match=message):
            sharded.upsert(ids, emb, attrs)
    assert sharded.size() == before


@pytest.mark.parametrize("tower", ["hstu", "sasrec"])
def test_a_sequence_tower_answers_through_the_shards_like_the_whole_model(tmp_path, tower):
    """The ingress reads the history's cached embeddings from the shards; the HSTU / SASRec tower
    then answers as the whole model (every list probed)."""
    snapshot = build_serving_snapshot(
        tmp_path / "whole", num_items=3000, dim=16, tower=tower, index_config=IndexConfig(nlist=4, nprobe=4)
    )
    single = load_model(snapshot)
    sharded = ShardedModel.local(split_snapshot(snapshot, tmp_path / "s", shards=3))
    ids = single.index.ids
    rng = np.random.default_rng(0)
    histories = [ids[rng.choice(len(ids), n, replace=False)].tolist() for n in (0, 1, 9, 40)]
    for flt in (None, "language:en"):
        want = single(single.inputs(histories), filter=flt, k=20, exclude=histories)
        got = sharded(sharded.inputs(histories), filter=flt, k=20, exclude=histories)
        for b, h in enumerate(histories):  # an empty history scores every item 0: ties in any order
            if h:
                assert got.ids[b].tolist() == want.ids[b].tolist()
            torch.testing.assert_close(got.scores[b], want.scores[b], rtol=1e-5, atol=1e-5)


# ---- replicas of a shard: every update on every replica, reads by sequence number ------------


class Recording(LocalReplica):
    """A local replica of the shard snapshot ``path`` that records each call: the searcher method
    a read asks for, or ``"apply"``."""

    def __init__(self, path: Path, digest: str) -> None:
        super().__init__(ShardSearcher.load(path, digest))
        self.path, self.calls = path, []

    def __call__(self, method: str, *args):
        self.calls.append(args[1] if method == "read" else method)
        return super().__call__(method, *args)

    def restart(self) -> None:
        """What Ray does to a replica it restarts: its shard snapshot loaded again, no update applied."""
        self.searcher = ShardSearcher.load(self.path)


def replicated(path: Path, replicas: int, kind: type[Recording] = Recording) -> ShardedModel:
    """``ShardedModel.local(path, replicas)``, its replicas ``kind``."""
    shards = [[kind(p, d) for _ in range(replicas)] for p, d in zip(shard_paths(path), shard_digests(path))]
    return ShardedModel(shards[0][0].searcher.model, shards)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 600-item snapshot (every list probed) and its 3-shard split."""
    root = tmp_path_factory.mktemp("replicas")
    snapshot = build_serving_snapshot(
        root / "one", num_items=600, seed=5, k0=30, nprobe=8, index_config=IndexConfig(nlist=8)
    )
    return snapshot, split_snapshot(snapshot, root / "sharded", shards=3)


FRESH = {"category": "fresh", "year": 2030}
REFUSED = {"year": "not a number"}  # refused by the shard's item store, after the ingress's checks
POOL = 10  # item slots: 0-4 the snapshot's items, 5-9 new ids
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("upsert"), st.sets(st.integers(0, POOL - 1), min_size=1, max_size=4)),
        st.tuples(st.just("delete"), st.sets(st.integers(0, POOL - 1), min_size=1, max_size=3)),
        st.tuples(st.just("refused"), st.sets(st.integers(0, POOL - 1), min_size=1, max_size=1)),
        st.tuples(st.just("restart"), st.tuples(st.integers(0, 2), st.integers(0, 2))),
    ),
    min_size=1,
    max_size=6,
)


def answers(model, history: list[int], flt: str | None, items: list[int]) -> tuple[torch.Tensor, ...]:
    """ids ``[1, 20]``, scores ``[1, 20]`` and (``items``: live ids) per-task scores ``[1, M, T]``:
    a search read, then (``items``) a states read."""
    inputs = model.inputs([history])
    got = model(inputs, filter=flt, k=20)
    return got.ids, got.scores, model.rank(inputs, torch.tensor([items])) if items else torch.zeros(0)


def assert_equal(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("replicas", [2, 3])
@settings(max_examples=15, deadline=None)
@given(steps=STEPS, seed=st.integers(0, 2**16))
def test_every_replica_answers_each_read_after_an_update_like_one_process(small, replicas, steps, seed):
    """Random upserts, deletes, refused upserts and restarts of a replica; after each, as many
    reads as replicas (so each replica of every shard answers one) answer exactly as the shards
    with one replica each, and hold the single-process model's fresh items and scores (those may
    differ in the last float bits: each shard scores its own candidates)."""
    snapshot, path = small
    single, one, sharded = load_model(snapshot), ShardedModel.local(path), replicated(path, replicas)
    ids = single.index.ids
    pool = ids[:5].tolist() + [10**9 + j for j in range(5)]
    live, history = set(pool[:5]), ids[10:14].tolist()
    every = [replica for shard in sharded.shards for replica in shard]
    gen = torch.Generator().manual_seed(seed)
    for op, arg in steps:
        if op == "restart":
            sharded.shards[arg[0]][arg[1] % replicas].restart()
        elif op == "delete":
            chosen = [pool[i] for i in sorted(arg)]
            assert sharded.delete(chosen) == one.delete(chosen) == single.delete(chosen)
            live -= set(chosen)
        else:
            chosen = [pool[i] for i in sorted(arg)]
            vectors = torch.nn.functional.normalize(torch.randn(len(chosen), single.dim, generator=gen), dim=1)
            attributes = [FRESH if op == "upsert" else REFUSED] * len(chosen)
            for model in (single, one, sharded):
                if op == "refused":
                    with pytest.raises(ValueError, match="the feature is numeric"):
                        model.upsert(chosen, vectors, attributes)
                else:
                    model.upsert(chosen, vectors, attributes)
            live |= set(chosen) if op == "upsert" else set()
        assert sharded.size() == one.size() == single.size()
        fresh = answers(one, history, "category:fresh", [])
        alone = single(single.inputs([history]), filter="category:fresh", k=20)
        assert fresh[0].sort().values.tolist() == alone.ids.sort().values.tolist()
        torch.testing.assert_close(fresh[1], alone.scores, rtol=1e-5, atol=1e-5, equal_nan=True)
        for replica in every:
            replica.calls.clear()
        for _ in range(replicas):
            assert_equal(answers(sharded, history, "category:fresh", []), fresh)
        assert all("search" in replica.calls for replica in every)  # the round robin reached each
        assert_equal(answers(sharded, history, None, sorted(live)), answers(one, history, None, sorted(live)))


def spanning_updates(single, gen: torch.Generator) -> tuple[list[tuple[str, tuple]], list[int]]:
    """Three updates, each touching all 3 shards (so each shard numbers them 1, 2, 3): an upsert of
    new ids, a delete, an upsert that overwrites a new id and an item of the snapshot; and the
    fresh items live after them."""
    ids = single.index.ids
    new, existing = [10**9, 10**9 + 1, 10**9 + 2], [int(ids[shard_of(ids, 3) == s][0]) for s in range(3)]

    def upsert(chosen: list[int]) -> tuple[str, tuple]:
        vectors = torch.nn.functional.normalize(torch.randn(len(chosen), single.dim, generator=gen), dim=1)
        return "upsert", (chosen, vectors, [FRESH] * len(chosen))

    updates = [upsert(new), ("delete", ([existing[0], new[1], existing[1]],)), upsert([new[0], new[2], existing[2]])]
    return updates, sorted([new[0], new[2], existing[2]])


def test_a_restarted_replica_is_caught_up_before_it_answers(small):
    """A replica restarted after three updates answers Behind to a read or an update past them; the
    ingress's next read that reaches it catches it up first, then it answers as one replica does."""
    snapshot, path = small
    single = load_model(snapshot)
    one, sharded = ShardedModel.local(path), replicated(path, 2)
    updates, live = spanning_updates(single, torch.Generator().manual_seed(0))
    for method, args in updates:
        assert set(shard_of(torch.tensor(args[0]), 3).tolist()) == {0, 1, 2}  # so each shard's seq is 1, 2, 3
        assert getattr(sharded, method)(*args) == getattr(one, method)(*args)
    restarted = sharded.shards[1][1]
    restarted.restart()
    pristine = restarted.searcher.size()
    assert restarted.searcher.read(3, "size") == Behind(0)  # a read it cannot answer yet
    assert restarted.searcher.apply(3, [updates[2]]) == Behind(0)  # a gap: nothing applied
    assert restarted.searcher.applied_seq == 0 and restarted.searcher.size() == pristine
    every = [replica for shard in sharded.shards for replica in shard]
    for replica in every:
        replica.calls.clear()
    history = single.index.ids[10:14].tolist()
    want = answers(one, history, "category:fresh", live)
    assert_equal(answers(sharded, history, "category:fresh", live), want)  # a search read, a states read
    first = restarted.calls[0]
    assert restarted.calls[:3] == [first, "apply", first]  # Behind, caught up, asked again
    assert restarted.searcher.applied_seq == 3
    assert all("apply" not in replica.calls for replica in every if replica is not restarted)
    assert_equal(answers(sharded, history, "category:fresh", live), want)
    assert restarted.calls.count("apply") == 1
    assert restarted.searcher.apply(2, [updates[1]]) == []  # applied already: skipped
    assert sharded.size() == one.size()


class Died:
    """The answer of a call to a replica that died on the way."""

    def result(self) -> object:
        raise ConnectionError("the replica died")


class Flaky(Recording):
    """A replica that Ray restarts before each call once ``restarting`` is set, and whose next
    ``dies`` calls die on the way (their answer raises; Ray starts it again)."""

    restarting, dies = False, 0

    def __call__(self, method: str, *args):
        if self.dies or self.restarting:
            self.restart()
        if self.dies:
            self.dies -= 1
            return Died()
        return super().__call__(method, *args)


def test_a_replica_that_keeps_restarting_is_an_error(small):
    """A read or an update that a replica answers Behind after every catch-up is a RuntimeError
    after MAX_CATCH_UPS of them (not a loop, not a stale answer)."""
    snapshot, path = small
    sharded = replicated(path, 2, Flaky)
    ((_, args), *_), _ = spanning_updates(load_model(snapshot), torch.Generator().manual_seed(1))
    sharded.upsert(*args)
    flaky = sharded.shards[2][1]
    flaky.restarting = True
    with pytest.raises(RuntimeError, match="shard 2 has applied its updates 1 … 0, not 1 … 1, after 3 catch-ups"):
        for _ in range(2):  # one of them reaches replica 1
            sharded(sharded.inputs([[]]), k=5)
    assert flaky.calls.count("apply") == 1 + ShardedModel.MAX_CATCH_UPS  # the upsert, the catch-ups
    with pytest.raises(RuntimeError, match="after 3 catch-ups"):
        sharded.delete(args[0])  # replica 0 applies it; this one is asked once more, and fails again
    assert sharded.shards[2][0].searcher.applied_seq == 2


def test_an_update_a_replica_failed_on_the_way_is_asked_again(small):
    """A replica died during an update (its call raised) while the other applied it: asked again,
    it is caught up from the journal and takes the update; the write is answered."""
    snapshot, path = small
    single = load_model(snapshot)
    one, sharded = ShardedModel.local(path), replicated(path, 2, Flaky)
    updates, live = spanning_updates(single, torch.Generator().manual_seed(2))
    for step, (method, args) in enumerate(updates):
        sharded.shards[step][step % 2].dies = 1
        assert getattr(sharded, method)(*args) == getattr(one, method)(*args)
    assert [[replica.searcher.applied_seq for replica in shard] for shard in sharded.shards] == [[3, 3]] * 3
    history = single.index.ids[10:14].tolist()
    for _ in range(2):
        assert_equal(answers(sharded, history, "category:fresh", live), answers(one, history, "category:fresh", live))
