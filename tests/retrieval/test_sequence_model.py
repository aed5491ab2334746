"""A next-item retriever (HSTU / SASRec) served as the user tower: the served model equals the
eager encoder followed by the exact filtered top-k over the index's stored vectors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sterling.index.item_index import IndexConfig
from sterling.models.sequence_tower import SequenceTowerConfig, SequenceUserTower
from sterling.models.towers import TaskQueries
from sterling.retrieval.config import ServingConfig
from sterling.retrieval.publish import NEXT_TASK, load_model, write_model_snapshot
from sterling.train.retrieval import RetrievalConfig, SequenceRetriever

N, D, MAX_LEN = 300, 16, 20
GENRES = ("a", "b", "c")


def retriever(encoder: str, seed: int = 0) -> SequenceRetriever:
    torch.manual_seed(seed)
    model = SequenceRetriever(N, RetrievalConfig(encoder=encoder, dim=D, num_layers=2, num_heads=2, max_len=MAX_LEN))
    with torch.no_grad():  # trained-looking scales: item norms spread, tokens distinct
        model.item_table.weight.normal_().mul_(torch.rand(N, 1) + 0.5)
    return model.eval()


def tower_of(model: SequenceRetriever) -> SequenceUserTower:
    cfg = model.cfg
    sizes = (cfg.encoder, cfg.dim, cfg.num_layers, cfg.num_heads, cfg.max_len, cfg.query_time)
    tower = SequenceUserTower(SequenceTowerConfig(*sizes))
    tower.encoder.load_state_dict(model.encoder.state_dict())
    return tower.eval()


def histories(rng: np.random.Generator, b: int) -> list[list[int]]:
    return [rng.integers(0, N, rng.integers(0, MAX_LEN + 1)).tolist() for _ in range(b)]


def jagged(hs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.tensor(np.cumsum([0] + [len(h) for h in hs]), dtype=torch.int64)
    return torch.tensor([i for h in hs for i in h], dtype=torch.int64), offsets


@pytest.mark.parametrize("encoder", ["hstu", "sasrec"])
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_the_tower_is_the_retrievers_query_at_the_last_event(encoder, seed):
    model = retriever(encoder)
    tower = tower_of(model)
    rng = np.random.default_rng(seed)
    hs = histories(rng, 5)
    items, offsets = jagged(hs)
    ts = torch.from_numpy(np.sort(rng.integers(0, 10**6, len(items))))
    request_ts = torch.from_numpy(rng.integers(10**6, 2 * 10**6, len(hs)))  # after every event
    vectors, actions = model.item_table(items), torch.ones_like(items)
    for asked in (None, request_ts):  # with the requests' times, or without (then the last event's)
        users = tower(vectors, actions, offsets, {}, ts, asked)  # [B, D]
        with torch.no_grad():
            queries = model(items, ts, offsets, asked)  # [L, D]
        for b, h in enumerate(hs):
            if h:
                torch.testing.assert_close(users[b], queries[int(offsets[b + 1]) - 1], rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(users[b], torch.zeros(D))
    if encoder == "hstu" and any(hs):  # the request's time is read: asked later, another query
        assert not torch.allclose(
            tower(vectors, actions, offsets, {}, ts), tower(vectors, actions, offsets, {}, ts, request_ts)
        )


@pytest.fixture(scope="module", params=["hstu", "sasrec"])
def served(request, tmp_path_factory):
    model = retriever(request.param, seed=1)
    item_ids = np.arange(N, dtype=np.int64) * 7 + 3
    attributes = [{"genre": GENRES[i % 3], "year": 1990 + i % 30} for i in range(N)]
    serving = ServingConfig(tasks=(NEXT_TASK,), k0=50, max_history=MAX_LEN)
    path = write_model_snapshot(
        tmp_path_factory.mktemp("seq") / request.param,
        tower_of(model).cfg,
        tower_of(model),
        TaskQueries(D, 1),
        None,
        item_ids,
        attributes,
        model.item_table.weight.detach(),
        serving,
        IndexConfig(nlist=8, nprobe=8),  # every list: the served top-k is exact
    )
    return model, item_ids, attributes, load_model(path)


def test_the_served_model_is_the_eager_encoder_and_the_exact_filtered_top_k(served):
    model, item_ids, attributes, loaded = served
    rng = np.random.default_rng(0)
    hs = [h for h in histories(rng, 12) if h]
    k, flt = 10, "genre:a OR year >= 2010"
    answer = loaded(loaded.inputs([[int(item_ids[i]) for i in h] for h in hs]), filter=flt, k=k)
    stored = loaded.index.embeddings_of(item_ids)  # [N, D] the int8 vectors, dequantized
    assert torch.allclose(stored, F.normalize(model.item_table.weight.detach(), dim=-1), atol=0.02)
    passing = torch.tensor([a["genre"] == "a" or a["year"] >= 2010 for a in attributes])
    items, offsets = jagged(hs)
    cached = model.item_table(items).detach().half().float()  # the history is read from the fp16 cache
    users = tower_of(model)(cached, torch.ones_like(items), offsets, {})  # [B, D]
    scores = (users @ stored.T).masked_fill(~passing, float("-inf"))  # [B, N]
    top = scores.topk(k, dim=1)
    assert answer.ids.tolist() == torch.from_numpy(item_ids)[top.indices].tolist()
    torch.testing.assert_close(answer.scores, top.values, rtol=1e-4, atol=1e-4)


def test_an_empty_history_still_gets_k_answers_under_its_filter(served):
    _, item_ids, attributes, loaded = served
    answer = loaded(loaded.inputs([[]]), filter="genre:b", k=7)
    assert (answer.ids >= 0).sum() == 7
    genre = {int(i): a["genre"] for i, a in zip(item_ids, attributes)}
    assert {genre[i] for i in answer.ids[0].tolist()} == {"b"}


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scale=st.floats(0.1, 10.0))
def test_an_upserted_item_is_indexed_by_its_direction_and_cached_as_given(served, scale):
    _, item_ids, _, loaded = served
    new_id = int(item_ids.max()) + 1
    embedding = torch.randn(1, D) * scale
    loaded.upsert([new_id], embedding, [{"genre": "c", "year": 2000}])
    try:
        row = loaded.rows_of(torch.tensor([new_id]))
        torch.testing.assert_close(loaded.index.vectors(row), F.normalize(embedding, dim=-1), atol=0.02, rtol=0)
        torch.testing.assert_close(loaded.items.history(row), embedding.half().float())
    finally:
        loaded.delete([new_id])
        loaded.compact()


def test_publish_serves_a_trained_retrievers_checkpoint(tmp_path):
    """``sterling train --model hstu --out`` → ``publish`` → the loaded model answers as the
    checkpoint's eager encoder and the exact top-k over its normalised item table."""
    from sterling.data.synth import SynthConfig, generate
    from sterling.retrieval.publish import publish
    from sterling.train.retrieval import train_retrieval
    from sterling.train.sequence_checkpoint import load_sequence_checkpoint

    data = generate(
        SynthConfig(num_users=60, num_items=80, history_length=(5, 15), requests_per_user=(1, 2), seed=5),
        tmp_path / "synth",
    )
    cfg = RetrievalConfig(encoder="hstu", dim=8, num_layers=1, max_len=10, epochs=1, batch_size=16, num_negatives=8)
    train_retrieval(data, cfg, log=lambda _: None, out_dir=tmp_path / "ckpt")
    ckpt = load_sequence_checkpoint(tmp_path / "ckpt" / "best")
    served = load_model(publish(tmp_path / "ckpt" / "best", data / "items.parquet", tmp_path / "snap", k0=20))
    assert served.config.tasks == (NEXT_TASK,) and served.overarch is None
    assert served.user_tower.cfg.query_time == ckpt.model.cfg.query_time == "request"
    history = [int(i) for i in ckpt.item_ids[[3, 1, 4, 1, 5]]]
    answer = served.recommend(history, k=5, exclude_seen=True)
    stored = served.index.embeddings_of(ckpt.item_ids)  # [N, D]
    rows = torch.tensor([3, 1, 4, 1, 5])
    cached = ckpt.model.item_table(rows).detach().half().float()
    user = tower_of(ckpt.model)(cached, torch.ones(5, dtype=torch.int64), torch.tensor([0, 5]), {})[0]
    scores = (stored @ user).index_fill(0, rows, float("-inf"))
    assert answer.ids[0].tolist() == torch.from_numpy(ckpt.item_ids)[scores.topk(5).indices].tolist()
    assert not set(answer.ids[0].tolist()) & set(history)


def test_the_exported_program_answers_as_the_eager_sequence_model(served):
    from sterling.retrieval.export import export_program, load_program, run_program

    _, item_ids, _, loaded = served
    program = load_program(export_program(loaded))
    for hs, flt in (([[0, 4, 9], [], [7] * 3 + [8] * (MAX_LEN - 3)], "genre:b"), ([[5, 1]], None)):
        inputs = loaded.inputs([[int(item_ids[i]) for i in h] for h in hs])
        plan = loaded.plan(len(hs), flt)
        want = loaded(inputs, filter=flt, k=10)
        ids, scores, _ = run_program(program, inputs, plan.probes, plan.allowed, k=10)
        torch.testing.assert_close(scores, want.scores, rtol=1e-4, atol=1e-4)
        for b, h in enumerate(hs):  # an empty history scores every item 0: ties in any order
            assert ids[b].tolist() == want.ids[b].tolist() if h else (ids[b] >= 0).all()
