"""Fresh items through the model's own item tower: an item upserted with its attributes alone is
embedded, indexed, cached and answered exactly as a re-publish with the item in the catalogue."""

import json
import urllib.request
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sterling.data.synth import SynthConfig, generate
from sterling.index.item_index import IndexConfig
from sterling.models.sequence_tower import SequenceTowerConfig, SequenceUserTower
from sterling.models.towers import TaskQueries
from sterling.retrieval.config import ServingConfig
from sterling.retrieval.publish import NEXT_TASK, load_model, publish, write_model_snapshot
from sterling.serving.shards import ShardedModel, split_snapshot
from sterling.serving.update_log import Update
from sterling.train.loop import TrainConfig, train
from sterling.train.overarch import OverArchTrainConfig

INDEX = IndexConfig(nlist=8, nprobe=8)  # every list probed: the answers are exact
NEW = 10**9 + 7  # an id the checkpoint never saw
TAG = "brand-new-tag"  # a tag value no trained item has: a filter that finds the new item alone


def _new_attributes(first: dict) -> dict:
    """The new item: a trained item's attributes, a creator and a tag the vocabulary lacks."""
    return {**first, "creator": 987_654, "tags": [*first.get("tags", []), TAG]}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A trained two-tower (with OverArch) published over its catalogue, and again over the
    catalogue plus the new item."""
    root = tmp_path_factory.mktemp("cold")
    data = generate(replace(SynthConfig(), num_users=80, num_items=400, seed=11), root / "data")
    ckpt = train(
        data,
        root / "ckpt",
        TrainConfig(epochs=1, max_steps=6, dim=16, hidden=32, overarch=OverArchTrainConfig(epochs=1, max_steps=4)),
        log=lambda s: None,
    ).checkpoint
    items = pq.read_table(data / "items.parquet")
    first = {k: v for k, v in items.slice(0, 1).to_pylist()[0].items() if k not in ("item_id", "title")}
    attributes = _new_attributes({k: v for k, v in first.items() if v is not None})
    row = {c: [None] for c in items.column_names} | {"item_id": [NEW], "title": ["new"]}
    row |= {k: [v] for k, v in attributes.items()}
    extended = root / "items_plus.parquet"
    pq.write_table(pa.concat_tables([items, pa.table(row, schema=items.schema)]), extended)
    kw = dict(index_config=INDEX, k0=40, value_formula="click + 0.5*like")
    before = publish(ckpt, data / "items.parquet", root / "snap", **kw)
    after = publish(ckpt, extended, root / "snap_plus", **kw)
    return root, data, ckpt, before, after, attributes


def _history(model) -> list[int]:
    return model.index.ids[:5].tolist()


def _assert_same_item(got, want, history) -> None:
    """``got`` (the new item upserted) and ``want`` (re-published with it) hold and answer it alike."""
    torch.testing.assert_close(got.index.embeddings_of([NEW]), want.index.embeddings_of([NEW]), atol=1e-6, rtol=0)
    cached = [m.index.table_rows(m.rows_of(torch.tensor([NEW]))).float() for m in (got, want)]
    torch.testing.assert_close(cached[0], cached[1], atol=2e-3, rtol=0)  # fp16 rows: one rounding step
    a, b = (m.recommend(history, filter=f"tags:{TAG}", k=3) for m in (got, want))
    assert a.ids[0].tolist() == b.ids[0].tolist() == [NEW, -1, -1]
    torch.testing.assert_close(a.scores[0, :1], b.scores[0, :1], atol=1e-4, rtol=0)
    torch.testing.assert_close(a.task_scores[0, :1], b.task_scores[0, :1], atol=1e-4, rtol=0)
    inputs = [m.inputs([history]) for m in (got, want)]
    torch.testing.assert_close(
        got.rank(inputs[0], torch.tensor([[NEW]])), want.rank(inputs[1], torch.tensor([[NEW]])), atol=1e-4, rtol=0
    )


def test_an_item_upserted_without_embedding_equals_a_republish_with_it(published):
    _, _, _, before, after, attributes = published
    model, want = load_model(before), load_model(after)
    assert model.meta["item_tower"]["term_vocab"] and "item_tower.mlp.0.weight" not in model.state_dict()
    model.upsert([NEW], None, [attributes])
    _assert_same_item(model, want, _history(want))
    # the item tower embeds from the attributes alone: the vector is what embed_items gives
    torch.testing.assert_close(
        model.items.history(model.rows_of(torch.tensor([NEW]))),
        model.embed_items([attributes]).half().float(),
    )
    # a catalogue item upserted from its attributes is embedded cold too (no id embedding)
    known = int(model.index.ids[0])
    model.upsert(attributes=model.index.attributes_of([known]), ids=[known])
    assert not torch.allclose(model.index.embeddings_of([known]), want.index.embeddings_of([known]), atol=1e-3)


def test_publish_takes_the_catalogue_in_any_order_with_more_items(published, tmp_path):
    root, data, ckpt, _, after, attributes = published
    table = pq.read_table(root / "items_plus.parquet")
    shuffled = tmp_path / "shuffled.parquet"
    pq.write_table(table.take(np.random.default_rng(0).permutation(len(table))), shuffled)
    again = load_model(publish(ckpt, shuffled, tmp_path / "snap", index_config=INDEX, k0=40))
    want = load_model(after)
    ids = want.index.ids
    torch.testing.assert_close(again.index.embeddings_of(ids), want.index.embeddings_of(ids), atol=1e-6, rtol=0)
    missing = tmp_path / "missing.parquet"
    pq.write_table(table.slice(1), missing)
    with pytest.raises(ValueError, match="differ .* lacks 1 of them"):
        publish(ckpt, missing, tmp_path / "bad", index_config=INDEX)


def test_the_update_log_embeds_cold_upserts_with_the_model_it_is_applied_to(published):
    _, _, _, before, after, attributes = published
    want = load_model(after)
    given = torch.nn.functional.normalize(torch.randn(1, want.dim), dim=-1)
    updates = [
        Update([NEW, NEW + 1], [None, given[0]], [attributes, {"tags": ["other"]}], []),
        Update([NEW + 2], torch.randn(1, want.dim), [{}], [NEW + 1]),
    ]
    model = load_model(before)
    Update.merged(updates).apply(model)
    _assert_same_item(model, want, _history(want))
    assert model.index.rows_of(torch.tensor([NEW + 1, NEW + 2]))[1].tolist() == [False, True]


def test_shards_embed_upserts_without_embedding_at_the_ingress(published, tmp_path):
    _, _, _, before, after, attributes = published
    sharded = ShardedModel.local(split_snapshot(before, tmp_path / "sharded", 2))
    sharded.upsert([NEW], None, [attributes])
    want = load_model(after)
    history = _history(want)
    a, b = sharded.recommend(history, filter=f"tags:{TAG}", k=3), want.recommend(history, filter=f"tags:{TAG}", k=3)
    assert a.ids[0].tolist() == b.ids[0].tolist() == [NEW, -1, -1]
    torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=0)
    history_row = want.items.history(want.rows_of(torch.tensor([NEW])))  # what a history naming it reads
    torch.testing.assert_close(sharded.inputs([[NEW]]).history_vectors, history_row, atol=2e-3, rtol=0)


def test_the_server_embeds_items_sent_without_embedding(published):
    pytest.importorskip("fastapi")
    from sterling.serving.server import BackgroundServer, ServerConfig

    _, _, _, before, after, attributes = published
    token = "t0ken"
    with BackgroundServer(ServerConfig(before, token=token)) as server:

        def post(path, body, auth=False):
            headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if auth else {})
            request = urllib.request.Request(server.url + path, json.dumps(body).encode(), headers)
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, json.loads(answer.read())

        items = [
            {"id": NEW, "attributes": attributes},  # embedded by the served item tower
            {"id": NEW + 1, "embedding": [0.25] * 16, "attributes": {"tags": ["given"]}},
        ]
        status, out = post("/v1/items", {"upsert": items}, auth=True)
        assert status == 200 and out["upserted"] == 2, out
        history = _history(load_model(after))
        want = load_model(after).recommend(history, filter=f"tags:{TAG}", k=3)
        for _ in range(2):  # and again after a reload, which re-applies the update log
            status, out = post("/v1/retrieve", {"history": history, "filter": f"tags:{TAG}", "k": 3})
            assert status == 200 and out["ids"] == [NEW], out
            assert out["scores"][0] == pytest.approx(want.scores[0, 0].item(), abs=1e-4)
            assert post("/v1/retrieve", {"history": history, "filter": "tags:given", "k": 3})[1]["ids"] == [NEW + 1]
            assert post("/v1/admin/reload", {}, auth=True)[0] == 200


def test_a_next_item_retriever_refuses_an_upsert_without_embedding(tmp_path):
    n, d = 30, 8
    tower = SequenceUserTower(SequenceTowerConfig("sasrec", d, 1, 1, 10)).eval()
    path = write_model_snapshot(
        tmp_path / "seq",
        tower.cfg,
        tower,
        TaskQueries(d, 1),
        None,
        np.arange(n, dtype=np.int64),
        [{"genre": "ab"[i % 2]} for i in range(n)],
        torch.randn(n, d),
        ServingConfig(tasks=(NEXT_TASK,), k0=10, max_history=10),
        IndexConfig(nlist=2),
    )
    model = load_model(path)
    with pytest.raises(ValueError, match="by id only"):
        model.upsert([n + 1], None, [{"genre": "a"}])
    with pytest.raises(ValueError, match="by id only"):
        Update([n + 1, n + 2], [None, torch.randn(d)], [{"genre": "a"}] * 2, []).apply(model)
    assert len(model.index) == n and model.size().fresh_items == 0  # nothing changed
