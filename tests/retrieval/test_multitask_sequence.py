"""A multi-task next-item retriever (``sterling train --model hstu --multi-task``) published: the
served model has the queries ``("next", *tasks)``, the trained task queries, per-task scores that
are those queries' inner products with the index's stored vectors, an answer ranked by the primary
task's, and a ranker stage on top of the same queries."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sterling.data.synth import SynthConfig, generate
from sterling.index.item_index import IndexConfig
from sterling.models.ranker import RankerConfig, SequenceRanker
from sterling.models.sequence_tower import SequenceTowerConfig, SequenceUserTower
from sterling.retrieval.publish import NEXT_TASK, load_model, publish
from sterling.train.ranker_checkpoint import write_ranker_checkpoint
from sterling.train.retrieval import RetrievalConfig, SequenceRetriever, load_catalog_timelines, load_task_names
from sterling.train.sequence_checkpoint import load_sequence_checkpoint, write_sequence_checkpoint

D, MAX_LEN = 8, 10


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A multi-task checkpoint of the synthetic data (every weight moved off its initial value, the
    task heads included) and its snapshot over one IVF list (exact top-k)."""
    tmp = tmp_path_factory.mktemp("multitask")
    data = generate(
        SynthConfig(num_users=60, num_items=80, history_length=(5, 15), requests_per_user=(1, 2), seed=5),
        tmp / "synth",
    )
    tasks = load_task_names(data)
    _, item_ids = load_catalog_timelines(data)
    torch.manual_seed(0)
    cfg = RetrievalConfig(encoder="hstu", dim=D, num_layers=1, max_len=MAX_LEN, multi_task=True)
    model = SequenceRetriever(len(item_ids), cfg, tasks)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    write_sequence_checkpoint(tmp / "ckpt", model, item_ids, {"epoch": 1})
    snap = publish(tmp / "ckpt", data / "items.parquet", tmp / "snap", IndexConfig(nlist=1), k0=len(item_ids))
    return data, load_sequence_checkpoint(tmp / "ckpt"), snap


def eager_queries(model: SequenceRetriever, rows: list[list[int]]) -> torch.Tensor:
    """The checkpoint's queries ``[B, 1 + T, D]`` after each history, as served: the history read
    from the fp16 cache, the encoder, then the task queries."""
    cfg = model.cfg
    tower = SequenceUserTower(SequenceTowerConfig(cfg.encoder, cfg.dim, cfg.num_layers, cfg.num_heads, cfg.max_len))
    tower.encoder.load_state_dict(model.encoder.state_dict())
    flat = torch.tensor([r for h in rows for r in h])
    offsets = torch.tensor(np.cumsum([0] + [len(h) for h in rows]))
    cached = model.item_table(flat).detach().half().float()
    with torch.no_grad():
        users = tower.eval()(cached, torch.ones_like(flat), offsets, {})  # [B, D]
        return model.all_queries(users)


HISTORIES = [[3, 1, 4, 1, 5], [9, 2, 6], [7], [10, 20, 30, 40, 50, 60, 70, 11, 12, 13]]


def test_the_served_queries_are_next_and_the_trained_task_queries(published):
    _, ckpt, snap = published
    model = load_model(snap)
    tasks = (NEXT_TASK, "click", "like", "share")
    assert model.config.tasks == tasks and model.config.query_tasks == tasks
    assert model.config.primary_task == NEXT_TASK and model.overarch is None and model.ranker is None
    weight = model.task_queries.proj.weight.detach()
    assert torch.count_nonzero(weight[:D]) == 0  # next: the user embedding itself
    assert torch.equal(weight[D:], ckpt.model.task_queries.proj.weight.detach())
    assert torch.equal(model.task_queries.proj.bias.detach()[D:], ckpt.model.task_queries.proj.bias.detach())

    ids = [[int(ckpt.item_ids[r]) for r in h] for h in HISTORIES]
    _, queries = model.encode(model.inputs(ids))  # [B, 4, D]
    torch.testing.assert_close(queries, eager_queries(ckpt.model, HISTORIES), rtol=1e-5, atol=1e-5)
    # and the eager retriever itself (histories read from its fp32 table, no fp16 round trip)
    for b, h in enumerate(HISTORIES):
        with torch.no_grad():
            out = ckpt.model(torch.tensor(h), torch.zeros(len(h), dtype=torch.int64), torch.tensor([0, len(h)]))
            torch.testing.assert_close(queries[b], ckpt.model.all_queries(out[-1:])[0], rtol=0, atol=5e-3)


def test_per_task_scores_are_the_task_queries_inner_products_and_next_ranks(published):
    _, ckpt, snap = published
    model = load_model(snap)
    ids = [[int(ckpt.item_ids[r]) for r in h] for h in HISTORIES]
    inputs = model.inputs(ids)
    stored = model.index.embeddings_of(ckpt.item_ids)  # [N, D] the int8 vectors, dequantized
    assert torch.allclose(stored, F.normalize(ckpt.model.item_table.weight.detach(), dim=-1), atol=0.02)
    queries = eager_queries(ckpt.model, HISTORIES)  # [B, 4, D]
    want = torch.einsum("btd,nd->bnt", queries, stored)  # [B, N, 4]
    all_ids = torch.from_numpy(ckpt.item_ids).repeat(len(HISTORIES), 1)
    torch.testing.assert_close(model.rank(inputs, all_ids), want, rtol=1e-5, atol=1e-5)
    # against the eager model's queries · normalised item vectors: int8 codes away
    exact = torch.einsum("btd,nd->bnt", queries, ckpt.model.item_vectors().detach())
    torch.testing.assert_close(model.rank(inputs, all_ids), exact, rtol=0, atol=0.03)

    k = 10
    answer = model(inputs, k=k)  # every item is a candidate of every query (k0 = N, one list)
    for b in range(len(HISTORIES)):
        top = want[b, :, 0].topk(k)
        assert answer.ids[b].tolist() == all_ids[b][top.indices].tolist()
        torch.testing.assert_close(answer.scores[b], top.values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(answer.task_scores[b], want[b, top.indices], rtol=1e-5, atol=1e-5)

    # another primary task ranks by its own query
    like = load_model(snap, primary_task="like")
    answer = like(inputs, k=k)
    for b in range(len(HISTORIES)):
        assert answer.ids[b].tolist() == all_ids[b][want[b, :, 2].topk(k).indices].tolist()


def test_with_a_ranker_the_task_queries_retrieve_and_the_ranker_scores(published, tmp_path):
    data, ckpt, snap = published  # the checkpoint is snap's sibling
    n = len(ckpt.item_ids)
    torch.manual_seed(1)
    ranker = SequenceRanker(RankerConfig(num_items=n, tasks=("click", "like"), dim=6, num_layers=1, dropout=0.0))
    write_ranker_checkpoint(tmp_path / "ranker", ranker, ckpt.item_ids, {})
    snap = publish(
        snap.parent / "ckpt",
        data / "items.parquet",
        tmp_path / "snap",
        IndexConfig(nlist=1),
        k0=20,
        ranker=tmp_path / "ranker",
    )
    model = load_model(snap)
    assert model.config.tasks == ("click", "like") and model.ranker is not None
    assert model.config.query_tasks == (NEXT_TASK, "click", "like", "share")
    assert model.task_queries.num_tasks == 4
    ids = [[int(ckpt.item_ids[r]) for r in h] for h in HISTORIES]
    answer = model(model.inputs(ids), k=5)
    assert answer.task_scores.shape == (len(HISTORIES), 5, 2) and (answer.ids >= 0).all()
    # the candidates are the union of the four queries' top-20: the answer is drawn from them
    queries = eager_queries(ckpt.model, HISTORIES)
    stored = model.index.embeddings_of(ckpt.item_ids)
    for b in range(len(HISTORIES)):
        union = set()
        for t in range(4):
            union |= set(ckpt.item_ids[(stored @ queries[b, t]).topk(20).indices.numpy()].tolist())
        assert set(answer.ids[b].tolist()) <= union
