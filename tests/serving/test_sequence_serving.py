"""A served HSTU snapshot behind the HTTP server and the micro-batcher: answers equal the model's,
the history is excluded by default, live items go through the tower's own item geometry."""

import json
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")

from sterling.index.item_index import IndexConfig  # noqa: E402
from sterling.models.sequence_tower import SequenceTowerConfig, SequenceUserTower  # noqa: E402
from sterling.models.towers import TaskQueries  # noqa: E402
from sterling.retrieval.config import ServingConfig  # noqa: E402
from sterling.retrieval.publish import NEXT_TASK, load_model, write_model_snapshot  # noqa: E402
from sterling.serving.batcher import BatcherConfig  # noqa: E402
from sterling.serving.server import BackgroundServer, ServerConfig  # noqa: E402

N, D = 500, 16


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    torch.manual_seed(0)
    tower = SequenceUserTower(SequenceTowerConfig("hstu", D, 2, 2, 30)).eval()
    item_ids = np.arange(N, dtype=np.int64) + 1000
    attributes = [{"genre": ("a", "b")[i % 2]} for i in range(N)]
    return write_model_snapshot(
        tmp_path_factory.mktemp("seq-serve") / "snap",
        tower.cfg,
        tower,
        TaskQueries(D, 1),
        None,
        item_ids,
        attributes,
        torch.randn(N, D),
        ServingConfig(tasks=(NEXT_TASK,), k0=40, max_history=30),
        IndexConfig(nlist=4, nprobe=4),
    )


def post(server, path, body):
    request = urllib.request.Request(
        server.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read())


def test_the_server_answers_what_the_sequence_model_answers(snapshot):
    model = load_model(snapshot)
    config = ServerConfig(snapshot, allow_no_auth=True, batcher=BatcherConfig(max_batch=8, max_wait_ms=5))
    with BackgroundServer(config) as server:
        rng = np.random.default_rng(0)
        for n in (0, 1, 7, 30):
            history = (rng.choice(N, n, replace=False) + 1000).tolist()
            out = post(server, "/v1/retrieve", {"history": history, "filter": "genre:a", "k": 10})
            want = model(model.inputs([history]), filter="genre:a", k=10, exclude=[history])
            assert out["ids"] == want.ids[0].tolist()
            assert not set(out["ids"]) & set(history) and len(out["ids"]) == 10
            torch.testing.assert_close(torch.tensor(out["scores"]), want.scores[0])
        ranked = post(server, "/v1/rank", {"history": [1000, 1001], "item_ids": [1002, 1003]})
        assert set(ranked["task_scores"]) == {NEXT_TASK} and None not in ranked["scores"]
        embedding = (5 * torch.randn(D)).tolist()
        post(server, "/v1/items", {"upsert": [{"id": 7, "embedding": embedding, "attributes": {"genre": "a"}}]})
        with torch.no_grad():
            user = model.user_tower(
                torch.tensor([embedding]).half().float(), torch.ones(1, dtype=torch.int64), torch.tensor([0, 1]), {}
            )
        out = post(server, "/v1/retrieve", {"history": [], "filter": "genre:a", "k": 3, "exclude_seen": False})
        assert out["ids"]  # an empty history answers too (every item scores 0)
        top = post(server, "/v1/rank", {"history": [7], "item_ids": [7]})
        indexed = torch.nn.functional.normalize(torch.tensor(embedding), dim=0)  # the index holds its direction
        assert top["scores"][0] == pytest.approx(float(user[0] @ indexed), abs=0.02)
