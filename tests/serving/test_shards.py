"""Item-sharded serving (sterling.serving.shards) against the single-process model: with every list
probed, the shards' merged answer is the model's, for random histories and filters."""

import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.index.config import IndexConfig
from sterling.retrieval.publish import load_model
from sterling.serving.shards import Candidates, ShardedModel, merge_topk, shard_of, shard_paths, split_snapshot
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
