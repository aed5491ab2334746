"""A Ray Serve app of 2 shards × 2 replicas (sterling.serving.ray_app) on 127.0.0.1 against the
single-process server on the same snapshot: the same ids and scores for random queries and filters,
through the same HTTP API, and after each live update's 200 from whichever replica answers. Runs with
the [ray] extra; ray.init(num_cpus=2)."""

import json
import shutil
import socket
import time
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
from sterling.serving.shards import ShardedModel, split_snapshot  # noqa: E402
from sterling.testing.snapshots import build_serving_snapshot  # noqa: E402

pytestmark = pytest.mark.ray

TOKEN = "t0ken"
N, NLIST, REPLICAS = 2_000, 16, 2
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
    serve.run(build_app(ServerConfig(sharded, token=TOKEN), replicas=REPLICAS), name="sterling", route_prefix="/")
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


def _replicas() -> dict[str, str]:
    """The actor name of each deployment's Serve replica (deployment name → actor name)."""
    return {
        a["name"].split("#")[1]: a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::sterling#")
    }


def _restart(*deployments: str) -> None:
    """Kill the replica of each deployment named and wait for the one Serve starts instead (which
    loads its shard again, none of the live updates applied)."""
    before = _replicas()
    for name in deployments:
        ray.kill(ray.get_actor(before[name], namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 120
    while not all(_replicas().get(name, before[name]) != before[name] for name in deployments):
        assert time.monotonic() < deadline, "Serve did not start the replicas again"
        time.sleep(0.2)


def test_a_write_is_seen_after_its_200_whichever_replica_answers(servers):
    """Live updates (upserts across both shards, an item of the snapshot overwritten, deletes) sent
    to the Ray app and to one process over the same snapshot; after each 200, reads that reach
    both replicas of each shard (each read goes to the next replica) answer as the process does:
    exactly as the shards in one process (``ShardedModel.local``), and with the whole model's ids.
    Before the fourth update, Ray restarts a replica of each shard: the update and the reads after
    it find them caught up. Last in the module: it changes both servers' items."""
    single, sharded = servers
    ids = single.service.model.index.ids.tolist()
    gen = torch.Generator().manual_seed(7)
    new = [99_999_990 + i for i in range(4)]  # both shards (id mod 2)

    def items(chosen: list[int]) -> list[dict]:
        vectors = torch.nn.functional.normalize(torch.randn(len(chosen), 64, generator=gen), dim=1)
        return [
            {"id": i, "embedding": v.tolist(), "attributes": {"category": "fresh-only", "year": 2030}}
            for i, v in zip(chosen, vectors)
        ]

    updates = [
        ({"upsert": items(new[:3])}, set(new[:3])),
        ({"upsert": items([new[3], ids[0]])}, {new[3], ids[0]}),  # ids[0]: an item of the snapshot
        ({"delete": [new[0], new[1], 12_345_678_901]}, set()),  # one unknown
        ({"upsert": items([new[1]]), "delete": [new[2], ids[0]]}, {new[1]}),
        ({"delete": [new[1], new[3]]}, set()),
    ]
    history = ids[10:14]
    live: set[int] = set()
    with BackgroundServer(
        ServerConfig(Path(single.service.info.path).parent / "sharded", token=TOKEN, loader=ShardedModel.local)
    ) as one:
        for step, (body, upserted) in enumerate(updates):
            if step == 3:
                _restart("shard-0-replica-1", "shard-1-replica-0")
            answers = [call(server, "/v1/items", body, token=TOKEN) for server in (single, one, sharded)]
            assert all(status == 200 for status, _ in answers), answers
            assert len({out["deleted"] for _, out in answers}) == 1, answers
            live = (live - set(body.get("delete", []))) | upserted
            reads = [
                ("/v1/retrieve", {"history": history, "filter": "category:fresh-only", "k": 10}),
                ("/v1/retrieve", {"history": history, "k": 20}),
                ("/v1/rank", {"history": history, "item_ids": sorted(live) + ids[20:22]}),
            ]  # an odd number of reads a round: the next round's go to the other replicas
            for _ in range(REPLICAS):
                for path, read in reads:
                    (a_status, a), (b_status, b), (c_status, c) = (call(s, path, read) for s in (single, one, sharded))
                    assert a_status == b_status == c_status == 200, (a, b, c)
                    assert c["scores"] == b["scores"] and c.get("ids") == b.get("ids"), (path, read)
                    assert c.get("ids") == a.get("ids"), (path, read)
                    torch.testing.assert_close(
                        torch.tensor(c["scores"]), torch.tensor(a["scores"]), rtol=1e-5, atol=1e-5
                    )
            fresh = call(sharded, "/v1/retrieve", reads[0][1])[1]["ids"]
            assert sorted(fresh) == sorted(live)  # the writes, each visible
