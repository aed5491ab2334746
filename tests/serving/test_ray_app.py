"""A 2-shard Ray Serve app (sterling.serving.ray_app) on 127.0.0.1 against the single-process
server on the same snapshot: the same ids and scores for random queries and filters, through the
same HTTP API. Runs with the [ray] extra; ray.init(num_cpus=2)."""

import json
import shutil
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")
serve = pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")

from sterling.index.config import IndexConfig  # noqa: E402
from sterling.retrieval.publish import load_model  # noqa: E402
from sterling.serving.ray_app import build_app  # noqa: E402
from sterling.serving.server import BackgroundServer, ServerConfig  # noqa: E402
from sterling.serving.shards import split_snapshot  # noqa: E402
from sterling.testing.snapshots import build_serving_snapshot  # noqa: E402

pytestmark = pytest.mark.ray

TOKEN = "t0ken"
N, NLIST = 2_000, 16
FILTERS = [
    None,
    "category:music",
    "year >= 2015",
    "NOT language:en AND kids:0",
    "tags IN (music-live, gaming-live) OR year < 1990",
    "category:no-such-category",
]


class _Url:
    def __init__(self, url: str) -> None:
        self.url = url


def call(server, path, body=None, token=None):
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(server.url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-app")
    snapshot = build_serving_snapshot(
        root / "one", num_items=N, seed=3, k0=40, nprobe=NLIST, index_config=IndexConfig(nlist=NLIST)
    )
    sharded = split_snapshot(snapshot, root / "sharded", shards=2)
    other = build_serving_snapshot(
        root / "other", num_items=N, seed=3, model_seed=4, k0=40, nprobe=NLIST, index_config=IndexConfig(nlist=NLIST)
    )  # other weights, same items
    split_snapshot(other, root / "other-sharded", shards=2)
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(ServerConfig(sharded, token=TOKEN), replicas=1), name="sterling", route_prefix="/")
    try:
        with BackgroundServer(ServerConfig(snapshot, token=TOKEN)) as single:
            yield single, _Url(f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()
        ray.shutdown()


def test_sharded_app_answers_like_the_single_server(servers):
    single, sharded = servers
    ids = single.service.model.index.ids.numpy()
    rng = np.random.default_rng(0)
    for i in range(12):
        body = {
            "history": rng.choice(ids, int(rng.integers(0, 20))).tolist(),
            "features": {"surface": ["home", "search"][i % 2], "hour": int(rng.integers(0, 24))},
            "filter": FILTERS[i % len(FILTERS)],
            "k": int(rng.integers(1, 41)),
        }
        a, b = call(single, "/v1/retrieve", body), call(sharded, "/v1/retrieve", body)
        assert a[0] == b[0] == 200, (a, b)
        assert b[1]["ids"] == a[1]["ids"], body
        torch.testing.assert_close(torch.tensor(b[1]["scores"]), torch.tensor(a[1]["scores"]), rtol=0, atol=0)
        for task, scores in a[1]["task_scores"].items():
            torch.testing.assert_close(torch.tensor(b[1]["task_scores"][task]), torch.tensor(scores), rtol=0, atol=0)
    rank = {"history": ids[:5].tolist(), "item_ids": ids[100:110].tolist()}
    a, b = call(single, "/v1/rank", rank), call(sharded, "/v1/rank", rank)
    assert a[0] == b[0] == 200
    torch.testing.assert_close(torch.tensor(b[1]["scores"]), torch.tensor(a[1]["scores"]), rtol=0, atol=0)


def test_sharded_app_speaks_the_same_api(servers):
    single, sharded = servers
    status, info = call(sharded, "/v1/snapshot")
    assert status == 200 and info["items"] == N and info["tasks"] == ["click", "like", "share"]
    status, out = call(sharded, "/v1/retrieve", {"history": [], "filter": "year >=", "k": 5})
    assert status == 400 and out["error"]["code"] == "bad_filter"
    status, out = call(sharded, "/v1/retrieve", {"history": [-7], "k": 5})
    assert status == 400 and "unknown item ids [-7]" in out["error"]["message"]
    assert call(sharded, "/v1/items", {"delete": [1]})[0] == 401


def test_hot_reload_across_the_shards(servers, tmp_path):
    single, sharded = servers
    root = Path(single.service.info.path).parent
    body = {"history": single.service.model.index.ids[:6].tolist(), "filter": "year >= 2000", "k": 20}
    before = call(sharded, "/v1/retrieve", body)[1]
    other = load_model(root / "other")
    want = other(other.inputs([body["history"]]), filter="year >= 2000", k=20, exclude=[body["history"]])
    status, info = call(sharded, "/v1/admin/reload", {"path": str(root / "other-sharded")}, token=TOKEN)
    assert status == 200, info
    after = call(sharded, "/v1/retrieve", body)[1]
    assert after["snapshot"] == info["version"] != before["snapshot"]
    assert after["ids"] == want.ids[0].tolist() != before["ids"]  # the other model's answer, from its shards
    broken = root / f"broken-{tmp_path.name}"  # reload loads only under the served snapshot's parent
    shutil.copytree(root / "sharded", broken)
    described = json.loads((broken / "shards.json").read_text())
    described["manifests_sha256"][1] = "0" * 64
    (broken / "shards.json").write_text(json.dumps(described))
    status, out = call(sharded, "/v1/admin/reload", {"path": str(broken)}, token=TOKEN)
    assert status == 422 and "the shards are not one snapshot" in out["error"]["message"]
    assert call(sharded, "/v1/retrieve", body)[1]["ids"] == after["ids"]  # the old one keeps serving
    status, info = call(sharded, "/v1/admin/reload", {"path": str(root / "sharded")}, token=TOKEN)
    assert status == 200 and call(sharded, "/v1/retrieve", body)[1]["ids"] == before["ids"]


def test_updates_reach_their_shard(servers):
    _, sharded = servers
    vector = torch.nn.functional.normalize(torch.randn(64), dim=0).tolist()
    item = {"id": 99_999_991, "embedding": vector, "attributes": {"category": "fresh-only"}}
    status, out = call(sharded, "/v1/items", {"upsert": [item]}, token=TOKEN)
    assert status == 200, out
    status, out = call(sharded, "/v1/retrieve", {"history": [], "filter": "category:fresh-only", "k": 5})
    assert status == 200 and out["ids"] == [99_999_991]
    status, out = call(sharded, "/v1/items", {"delete": [99_999_991]}, token=TOKEN)
    assert status == 200 and out["deleted"] == 1
    assert call(sharded, "/v1/retrieve", {"history": [], "filter": "category:fresh-only", "k": 5})[1]["ids"] == []
