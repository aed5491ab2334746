"""`sterling serve` over a real socket on 127.0.0.1: every endpoint, every bad input, auth, hot swap
under concurrent requests and the visibility of live updates."""

import asyncio
import json
import shutil
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
aiohttp = pytest.importorskip("aiohttp")

from sterling.data.synth import SynthConfig, generate  # noqa: E402
from sterling.retrieval.publish import load_model  # noqa: E402
from sterling.serving.batcher import BatcherConfig  # noqa: E402
from sterling.serving.server import BackgroundServer, ServerConfig  # noqa: E402
from sterling.serving.service import Limits  # noqa: E402
from sterling.serving.users import UserStore  # noqa: E402
from sterling.testing.snapshots import build_serving_snapshot  # noqa: E402

TOKEN = "s3cret"
N = 3_000
FORMULAS = (("engagement", "like + share"), ("clicks", "click"))


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """Two models over one catalogue (A, B), and a users table whose timelines name its items."""
    root = tmp_path_factory.mktemp("server")
    a = build_serving_snapshot(root / "a", num_items=N, seed=5, k0=100, nprobe=8)
    b = build_serving_snapshot(root / "b", num_items=N, seed=5, model_seed=6, k0=100, nprobe=8)
    data = generate(replace(SynthConfig(), num_users=30, num_items=200, seed=2), root / "data")
    return root, a, b, data / "users.parquet"


@pytest.fixture(scope="module")
def server(snapshots):
    _, a, _, _ = snapshots
    config = ServerConfig(
        a,
        token=TOKEN,
        value_formulas=FORMULAS,
        batcher=BatcherConfig(max_batch=8, max_wait_ms=5),
        limits=Limits(
            max_k=50,
            max_history=300,
            max_filter_chars=200,
            max_rank_items=40,
            max_update_items=5,
            max_body_bytes=200_000,
        ),
    )
    with BackgroundServer(config) as s:
        yield s


def call(server, path, body=None, token=None, raw: bytes | None = None, method=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(server.url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            text = r.read()
            return (
                r.status,
                (json.loads(text) if "json" in r.headers.get("content-type", "") else text.decode()),
                r.headers,
            )
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def history(server, n=5, offset=0):
    return server.service.model.index.ids[offset : offset + n].tolist()


# ---- the endpoints -------------------------------------------------------------------------------


def test_retrieve_never_answers_the_history_or_excluded_ids_and_still_answers_k(server):
    model = server.service.model
    hist = history(server, 7)
    body = {"history": hist, "features": {"surface": "home"}, "k": 20, "exclude_seen": False}
    status, plain, _ = call(server, "/v1/retrieve", body)
    assert status == 200, plain
    shown = plain["ids"][:5]
    status, out, _ = call(server, "/v1/retrieve", {**body, "exclude_seen": True, "exclude_ids": shown})
    assert status == 200, out
    assert len(out["ids"]) == 20 and not set(out["ids"]) & (set(hist) | set(shown))
    kept = [i for i in plain["ids"] if i not in set(hist) | set(shown)]
    assert out["ids"][: len(kept)] == kept  # the rest keep their order
    assert model.config.k0 >= 20
    status, out, _ = call(server, "/v1/retrieve", {**body, "exclude_ids": "x"})
    assert status == 422


def test_retrieve_answers_what_the_model_answers(server):
    model = server.service.model
    for flt, k, value, seen in (
        (None, 10, None, True),
        ("language:en", 20, None, False),
        ("year >= 2000 AND NOT kids:1", 5, "engagement", True),
        ("category:music OR tags IN (music-live)", 50, "clicks", None),
    ):
        body = {"history": history(server, 7), "features": {"surface": "home", "hour": 3}, "filter": flt, "k": k}
        if value:
            body["value"] = value
        if seen is not None:
            body["exclude_seen"] = seen
        status, out, _ = call(server, "/v1/retrieve", body)
        assert status == 200, out
        inputs = model.inputs([body["history"]], features=[{"surface": __import__("zlib").crc32(b"home"), "hour": 3}])
        formula = dict(FORMULAS).get(value)
        exclude = None if seen is False else [body["history"]]  # the history is excluded by default
        want = model(inputs, filter=[flt], k=k, value=formula, exclude=exclude)
        found = int((want.ids[0] >= 0).sum())
        assert out["ids"] == want.ids[0, :found].tolist() and len(out["ids"]) == min(k, found)
        if exclude:
            assert not set(out["ids"]) & set(body["history"])
        torch.testing.assert_close(torch.tensor(out["scores"]), want.scores[0, :found])
        assert set(out["task_scores"]) == {"click", "like", "share"}
        torch.testing.assert_close(torch.tensor(out["task_scores"]["like"]), want.task_scores[0, :found, 1])
        if flt == "language:en":
            assert all(a["language"] == "en" for a in model.index.attributes_of(out["ids"]))
        assert out["snapshot"] == server.service.info.version
        assert {"queue", "user_tower", "ann", "overarch", "value_model", "total"} <= set(out["timing_ms"])


def test_retrieve_returns_only_the_asked_tasks(server):
    status, out, _ = call(server, "/v1/retrieve", {"history": history(server), "k": 3, "tasks": ["share"]})
    assert status == 200 and list(out["task_scores"]) == ["share"] and len(out["task_scores"]["share"]) == 3


def test_rank_scores_the_given_items_from_the_cache(server):
    model = server.service.model
    items = history(server, 6, offset=100)
    status, out, _ = call(server, "/v1/rank", {"history": history(server, 4), "item_ids": items, "value": "engagement"})
    assert status == 200, out
    inputs = model.inputs([history(server, 4)])
    scores = model.rank(inputs, torch.tensor([items]))[0]
    torch.testing.assert_close(torch.tensor(out["task_scores"]["click"]), scores[:, 0])
    torch.testing.assert_close(torch.tensor(out["scores"]), scores[:, 1] + scores[:, 2])
    assert out["item_ids"] == items


def test_items_upserted_are_found_deleted_are_gone_and_counted(server):
    service = server.service
    items, fresh = len(service.model.index), service.model.index.fresh_items
    creator = 9 * 10**8  # no catalogue item has it
    new = [
        {
            "id": 5 * 10**12 + j,
            "embedding": torch.nn.functional.normalize(torch.ones(64) + j, dim=0).tolist(),
            "attributes": {"category": "music", "creator": creator + j, "year": 2001},
        }
        for j in range(2)
    ]
    new.append({"id": -7, "embedding": [0.125] * 64, "attributes": {"creator": creator + 2}})  # negative ids are items
    status, out, _ = call(server, "/v1/items", {"upsert": new}, token=TOKEN)
    assert status == 200 and out == {"upserted": 3, "deleted": 0, "items": items + 3, "fresh_items": fresh + 3}, out
    for j, item in enumerate(new):
        status, out, _ = call(
            server, "/v1/retrieve", {"history": history(server), "filter": f"creator:{creator + j}", "k": 10}
        )
        assert status == 200 and out["ids"] == [item["id"]], out
        assert service.model.index.attributes_of([item["id"]])[0]["creator"] == creator + j
    status, out, _ = call(server, "/v1/rank", {"history": history(server), "item_ids": [new[0]["id"], -7]})
    assert status == 200 and out["item_ids"] == [new[0]["id"], -7] and len(out["scores"]) == 2
    # a history may name an upserted item
    assert call(server, "/v1/retrieve", {"history": [new[1]["id"]], "k": 3})[0] == 200

    gone = new[0]["id"]
    status, out, _ = call(server, "/v1/items", {"delete": [gone, 4 * 10**12]}, token=TOKEN)  # an unknown id is ignored
    assert status == 200 and out["upserted"] == 0 and out["deleted"] == 1 and out["items"] == items + 2, out
    flt = f"creator:{creator} OR creator:{creator + 1} OR creator:{creator + 2}"
    status, out, _ = call(server, "/v1/retrieve", {"history": history(server), "filter": flt, "k": 10})
    assert status == 200 and sorted(out["ids"]) == sorted([new[1]["id"], -7]), out
    for wide in (None, "category:music"):
        body = {"history": history(server), "filter": wide, "k": 50}
        assert gone not in call(server, "/v1/retrieve", body)[1]["ids"]
    status, out, _ = call(server, "/v1/items", {"delete": [new[1]["id"], -7]}, token=TOKEN)
    assert status == 200 and out["deleted"] == 2 and out["items"] == items
    assert call(server, "/v1/retrieve", {"history": [], "filter": flt, "k": 10})[1]["ids"] == []
    assert call(server, "/v1/snapshot")[1]["items"] == items


def test_snapshot_health_ready_docs(server):
    status, info, _ = call(server, "/v1/snapshot")
    assert status == 200 and info["version"] == server.service.info.version and info["items"] >= N - 10
    assert info["tasks"] == ["click", "like", "share"] and info["value_formulas"]["engagement"] == "like + share"
    assert call(server, "/healthz")[:2] == (200, {"status": "ok"})
    status, ready, _ = call(server, "/readyz")
    assert status == 200 and ready["ready"] is True
    status, spec, _ = call(server, "/openapi.json")
    assert status == 200 and {"/v1/retrieve", "/v1/rank", "/v1/items", "/v1/admin/reload"} <= set(spec["paths"])
    assert call(server, "/docs")[0] == 200


def test_metrics_count_requests_stages_batches_and_the_index(server):
    call(server, "/v1/retrieve", {"history": history(server), "filter": "language:en", "k": 5})
    call(server, "/v1/retrieve", {"history": [-5], "k": 5})
    status, text, _ = call(server, "/metrics")
    assert status == 200
    assert 'sterling_requests_total{endpoint="/v1/retrieve",status="200"}' in text
    assert 'sterling_requests_total{endpoint="/v1/retrieve",status="400"}' in text
    for stage in ("queue", "user_tower", "ann", "overarch", "value_model"):
        assert f'sterling_stage_latency_seconds_count{{stage="{stage}"}}' in text
    assert "sterling_batch_size_count" in text and "sterling_candidates_after_filter_count" in text
    assert (
        f'sterling_snapshot_info{{path="{server.service.info.path}",version="{server.service.info.version}"}} 1.0'
        in text
    )
    items = [line for line in text.splitlines() if line.startswith("sterling_index_items ")]
    assert items and float(items[0].split()[1]) == len(server.service.model.index)


def test_users_by_id(snapshots, tmp_path):
    _, a, _, users_path = snapshots
    store = UserStore.read(users_path)
    model = load_model(a)
    # the users' timelines name items of the synthetic dataset: give the store this catalogue's ids instead
    ids = model.index.ids.tolist()
    store_items = [ids[i % len(ids)] for i in range(len(store.items))]
    import pyarrow.parquet as pq

    table = pq.read_table(users_path)
    flat = iter(store_items)
    column = [[next(flat) for _ in row] for row in table.column("timeline_item_id").to_pylist()]
    idx = table.schema.get_field_index("timeline_item_id")
    table = table.set_column(idx, table.schema.field(idx), [column])
    pq.write_table(table, tmp_path / "users.parquet")
    with BackgroundServer(ServerConfig(a, allow_no_auth=True, users=tmp_path / "users.parquet")) as s:
        user = int(store.user_ids[3])
        status, out, _ = call(s, "/v1/retrieve", {"user_id": user, "k": 5})
        assert status == 200, out
        events, actions, features = UserStore.read(tmp_path / "users.parquet").get(user, model.config.max_history)
        want = model(model.inputs([events], [actions], [features]), k=5, exclude=[events])  # the stored history
        assert out["ids"] == want.ids[0][want.ids[0] >= 0].tolist()
        status, both, _ = call(s, "/v1/retrieve", {"user_id": user, "history": ids[:2], "k": 5})
        want = model(model.inputs([events + ids[:2]], [actions + [1, 1]], [features]), k=5, exclude=[events + ids[:2]])
        assert status == 200 and both["ids"] == want.ids[0][want.ids[0] >= 0].tolist()
        status, err, _ = call(s, "/v1/retrieve", {"user_id": 10**12})
        assert status == 404 and err["error"]["code"] == "unknown_user"
    # the history limit bounds the events a request carries, not the user's stored timeline
    assert len(events) > 2
    with BackgroundServer(
        ServerConfig(a, allow_no_auth=True, users=tmp_path / "users.parquet", limits=Limits(max_history=2))
    ) as s:
        status, out, _ = call(s, "/v1/retrieve", {"user_id": user, "history": ids[:2], "k": 5})
        assert status == 200 and out["ids"] == both["ids"], out
        status, err, _ = call(s, "/v1/retrieve", {"user_id": user, "history": ids[:3], "k": 5})
        assert status == 400 and "a history of 3 events is longer than the limit 2" in err["error"]["message"]


# ---- bad input -------------------------------------------------------------------------------


BAD = [
    # (path, body or raw bytes, status, code, words in the message)
    ("/v1/retrieve", b'{"history": [1, 2', 422, "invalid_request", "JSON"),
    ("/v1/retrieve", b"[1, 2]", 422, "invalid_request", ""),
    ("/v1/retrieve", {"history": [], "k": "10"}, 422, "invalid_request", "k"),
    ("/v1/retrieve", {"history": [1.5]}, 422, "invalid_request", "history"),
    ("/v1/retrieve", {"history": [True]}, 422, "invalid_request", "history"),
    ("/v1/retrieve", {"history": [], "colour": "red"}, 422, "invalid_request", "colour"),
    ("/v1/retrieve", b'{"history": [], "k": NaN}', 422, "invalid_request", "k"),
    ("/v1/retrieve", {"history": [], "k": 0}, 400, "bad_request", "k must be in [1, 50]"),
    ("/v1/retrieve", {"history": [], "k": -3}, 400, "bad_request", "k must be"),
    ("/v1/retrieve", {"history": [], "k": 51}, 400, "bad_request", "k must be in [1, 50]"),
    ("/v1/retrieve", {"history": [], "k": 2**70}, 400, "bad_request", "k must be"),
    ("/v1/retrieve", {"history": [7] * 301}, 400, "bad_request", "longer than the limit 300"),
    ("/v1/retrieve", {"history": [], "filter": "language:en OR " * 20}, 400, "bad_request", "limit 200"),
    ("/v1/retrieve", {"history": [], "filter": "language:en AND (year > 3"}, 400, "bad_filter", "position"),
    ("/v1/retrieve", {"history": [], "filter": "colour:red"}, 400, "bad_filter", "colour"),
    ("/v1/retrieve", {"history": [], "features": {"weather": 1}}, 400, "bad_request", "weather"),
    ("/v1/retrieve", {"history": [], "features": {"hour": 1.5}}, 422, "invalid_request", "hour"),
    ("/v1/retrieve", {"history": [], "features": {"hour": 2**63}}, 422, "invalid_request", "hour"),
    ("/v1/retrieve", {"history": [], "features": {"hour": -(2**63) - 1}}, 422, "invalid_request", "hour"),
    ("/v1/retrieve", b'{"history": [], "filter": ', 422, "invalid_request", "JSON"),
    ("/v1/retrieve", b"\xff\xfe", 422, "invalid_request", "JSON"),
    ("/v1/retrieve", b"null", 422, "invalid_request", ""),
    ("/v1/retrieve", {"history": [], "actions": [2**63]}, 400, "bad_request", "actions"),
    ("/v1/retrieve", {"history": [], "k": True}, 422, "invalid_request", "k"),
    ("/v1/rank", {"history": [], "item_ids": [True]}, 422, "invalid_request", "item_ids"),
    ("/v1/rank", {"history": [], "item_ids": [1.0]}, 422, "invalid_request", "item_ids"),
    ("/v1/rank", {"history": [], "item_ids": [1], "tasks": ["purchase"]}, 400, "bad_request", "purchase"),
    ("/v1/rank", {"history": [], "item_ids": [1], "value": "profit"}, 400, "bad_request", "profit"),
    ("/v1/retrieve", {"history": [123456789012]}, 400, "bad_request", "unknown item ids [123456789012]"),
    ("/v1/retrieve", {"history": [2**64]}, 422, "invalid_request", "history"),
    ("/v1/retrieve", {"history": [], "tasks": ["purchase"]}, 400, "bad_request", "purchase"),
    ("/v1/retrieve", {"history": [], "value": "profit"}, 400, "bad_request", "profit"),
    ("/v1/retrieve", {"history": [1, 2], "actions": [1]}, 400, "bad_request", "2 history items but 1 actions"),
    ("/v1/retrieve", {"user_id": 3}, 400, "bad_request", "user store"),
    ("/v1/rank", {"history": [], "item_ids": [123456789012]}, 400, "bad_request", "unknown item ids"),
    ("/v1/rank", {"history": [], "item_ids": []}, 400, "bad_request", "1 to 40"),
    ("/v1/rank", {"history": [], "item_ids": list(range(41))}, 400, "bad_request", "1 to 40"),
    ("/v1/rank", {"history": []}, 422, "invalid_request", "item_ids"),
    ("/v1/retrieve", {"history": list(range(60_000))}, 413, "too_large", "bytes"),
    ("/v1/nothing", {}, 404, "not_found", ""),
]


@pytest.mark.parametrize("path, body, status, code, words", BAD)
def test_bad_input_is_a_4xx_with_a_json_error(server, path, body, status, code, words):
    got, out, _ = call(server, path, **({"raw": body} if isinstance(body, bytes) else {"body": body}))
    assert got == status, out
    assert out["error"]["code"] == code and words in out["error"]["message"]
    assert "Traceback" not in json.dumps(out)
    if code == "bad_filter" and "position" in words:
        assert out["error"]["position"] == len("language:en AND ")  # the unclosed parenthesis


BAD_UPDATES = [
    ({"upsert": [{"id": 1, "embedding": [0.1] * 63, "attributes": {}}]}, 400, "dimension"),
    ({"upsert": [{"id": 5, "embedding": [0.1] * 64}, {"id": 5, "embedding": [0.2] * 64}]}, 400, "5"),
    ({"upsert": [{"id": 1, "embedding": [0.1] * 64, "attributes": {"colour": "red"}}]}, 400, "colour"),
    ({"upsert": [{"id": 1, "embedding": [0.1] * 64}, {"id": 2, "embedding": [0.1] * 65}]}, 400, "different lengths"),
    ({"delete": list(range(6))}, 400, "limit 5"),
    ({"upsert": [{"id": 1, "embedding": ["a"] * 64}]}, 422, "embedding"),
    ({"remove": [1]}, 422, "remove"),
    ({"upsert": [{"id": 1, "embedding": [10**400] + [0.1] * 63}]}, 422, "embedding"),  # no float holds it
    ({"upsert": [{"id": 1, "embedding": [1e39] + [0.1] * 63}]}, 400, "NaN or inf"),  # inf as float32
    ({"upsert": [{"id": 1, "embedding": [1e30] + [0.1] * 63}]}, 400, "within ±65504"),  # overflows the fp16 cache
    ({"upsert": [{"id": -1, "embedding": [0.1] * 64}]}, 400, "reserved"),  # -1 pads results
    ({"upsert": [{"id": 1, "embedding": [0.1] * 64, "attributes": {"year": "old"}}]}, 400, "year"),
    ({"upsert": [{"id": 1, "embedding": [0.1] * 64, "vector": [1]}]}, 422, "vector"),
    # a snapshot without an item tower (published from embeddings) cannot embed an item itself
    ({"upsert": [{"id": 1, "embedding": [0.1] * 64}, {"id": 2, "attributes": {}}]}, 400, "no item tower"),
]


@pytest.mark.parametrize("body, status, words", BAD_UPDATES)
def test_bad_updates_are_refused_and_change_nothing(server, body, status, words):
    before = (len(server.service.model.index), server.service.model.index.fresh_items)
    got, out, _ = call(server, "/v1/items", body, token=TOKEN)
    assert got == status and words in out["error"]["message"], out
    assert (len(server.service.model.index), server.service.model.index.fresh_items) == before


def test_a_body_without_a_length_is_limited_too(server):
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b'{"history": [' + b"1, " * 10_000
        try:
            for _ in range(20):  # 600 kB in all, never announced
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                chunk = b"1, " * 10_000
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and stopped reading
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            part = sock.recv(65536)
            if not part:
                break
            answer += part
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b'"too_large"' in body
    assert call(server, "/healthz")[0] == 200


def test_nan_and_infinity_in_an_embedding_are_refused(server):
    for literal in ("NaN", "Infinity", "-Infinity"):
        raw = ('{"upsert": [{"id": 9, "embedding": [' + ", ".join(["0.1"] * 63 + [literal]) + "]}]}").encode()
        status, out, _ = call(server, "/v1/items", raw=raw, token=TOKEN)
        assert status == 422 and out["error"]["code"] == "invalid_request", out


def _post(server, path, body: bytes, headers: dict) -> tuple[int, dict]:
    """A POST with exactly these headers (urllib would add a form Content-Type to a body sent without one)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request("POST", path, body=body, headers=headers)
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


@pytest.mark.parametrize(
    "content_type",
    [None, "application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"],
)
def test_a_json_body_without_the_json_content_type_is_a_422_naming_the_header(server, content_type):
    # curl -d without -H 'Content-Type: application/json' sends application/x-www-form-urlencoded
    headers = {} if content_type is None else {"Content-Type": content_type}
    body = json.dumps({"history": history(server), "k": 3}).encode()
    status, out = _post(server, "/v1/retrieve", body, headers)
    assert status == 422 and out["error"]["code"] == "invalid_request", out
    message = out["error"]["message"]
    assert "Content-Type: application/json" in message and (content_type or "no Content-Type") in message, message
    assert out["error"]["problems"]  # what FastAPI found, kept beside the message
    before = (len(server.service.model.index), server.service.model.index.fresh_items)
    update = json.dumps({"delete": history(server, 1)}).encode()
    status, out = _post(server, "/v1/items", update, headers | {"Authorization": f"Bearer {TOKEN}"})
    assert status == 422 and "Content-Type: application/json" in out["error"]["message"], out
    assert (len(server.service.model.index), server.service.model.index.fresh_items) == before
    status, out = _post(server, "/v1/admin/reload", b"{}", headers | {"Authorization": f"Bearer {TOKEN}"})
    assert status == 422 and "Content-Type: application/json" in out["error"]["message"], out


def test_a_body_that_is_not_json_says_what_to_send(server):
    status, out = _post(server, "/v1/retrieve", b'{"k": 3', {"Content-Type": "application/json"})
    assert status == 422 and out["error"]["code"] == "invalid_request", out
    assert "not valid JSON" in out["error"]["message"] and "Content-Type: application/json" in out["error"]["message"]


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/vnd.sterling+json"])
def test_json_content_types_are_read_as_json(server, content_type):
    body = json.dumps({"history": history(server), "k": 3}).encode()
    status, out = _post(server, "/v1/retrieve", body, {"Content-Type": content_type})
    assert status == 200 and len(out["ids"]) == 3, out


def test_a_corrupt_or_missing_snapshot_is_refused_and_the_old_one_keeps_serving(server, tmp_path, snapshots):
    root, a, _, _ = snapshots
    corrupt = root / f"corrupt-{tmp_path.name}"
    shutil.copytree(a, corrupt)
    cache = corrupt / "cache.safetensors"
    data = bytearray(cache.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cache.write_bytes(bytes(data))
    version = server.service.info.version
    for path in (corrupt, root / "nowhere"):
        status, out, _ = call(server, "/v1/admin/reload", {"path": str(path)}, token=TOKEN)
        assert status == 422 and out["error"]["code"] == "snapshot_refused", out
        assert "old one keeps serving" in out["error"]["message"]
        assert server.service.info.version == version
        assert call(server, "/v1/retrieve", {"history": history(server), "k": 3})[0] == 200
    assert call(server, "/healthz")[0] == 200


def test_reload_loads_only_under_the_snapshot_root(server, tmp_path, snapshots):
    """Any path outside the root (existing or not, through ``..`` or a symbolic link) is one 403
    with one message: nothing is read there, and nothing says whether it exists."""
    root, a, _, _ = snapshots
    shutil.copytree(a, tmp_path / "outside")
    link = root / f"link-{tmp_path.name}"
    link.symlink_to(tmp_path / "outside")
    version = server.service.info.version
    messages = set()
    for path in ("/etc", tmp_path / "outside", tmp_path / "nowhere", root / ".." / "x", link, "relative/snap"):
        status, out, _ = call(server, "/v1/admin/reload", {"path": str(path)}, token=TOKEN)
        assert status == 403 and out["error"]["code"] == "outside_snapshot_root", (path, out)
        messages.add(out["error"]["message"])
    assert len(messages) == 1 and str(root.resolve()) in messages.pop()
    assert server.service.info.version == version
    assert call(server, "/v1/snapshot")[1]["snapshot_root"] == str(root.resolve())


def test_serve_refuses_a_busy_port_with_one_error_before_loading(snapshots, capsys):
    from sterling.cli import main
    from sterling.serving.server import bind

    _, a, _, _ = snapshots
    taken = bind("127.0.0.1", 0)
    port = taken.getsockname()[1]
    try:
        assert main(["serve", "--snapshot", str(a), "--port", str(port), "--insecure-no-auth"]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "in use" in err and "serving" not in err, err


def test_serve_threads_sets_torch_threads_and_is_refused_with_ray(snapshots, capsys, monkeypatch):
    import torch

    from sterling.cli import main
    from sterling.serving import server as server_module

    _, a, _, _ = snapshots
    before = torch.get_num_threads()
    monkeypatch.setattr(server_module, "serve", lambda config, host, port: None)
    try:
        assert main(["serve", "--snapshot", str(a), "--threads", "1", "--insecure-no-auth", "--no-log"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert main(["serve", "--snapshot", str(a), "--engine", "ray", "--threads", "1", "--insecure-no-auth"]) == 2
    assert "--threads: only with the local engine" in capsys.readouterr().err


def test_rank_never_answers_a_null_score(snapshots):
    _, a, _, _ = snapshots
    config = ServerConfig(a, allow_no_auth=True, value_formulas=(("broken", "log(click - click)"),))
    with BackgroundServer(config) as s:
        items = history(s, 3, offset=10)
        body = {"history": history(s), "item_ids": items, "value": "broken"}
        status, out, _ = call(s, "/v1/rank", body)
        assert (
            status == 400 and "no finite score" in out["error"]["message"] and str(items[0]) in out["error"]["message"]
        )
        status, out, _ = call(s, "/v1/rank", {**body, "value": None})
        assert status == 200 and all(v is not None for v in out["scores"]), out


def test_a_deeply_nested_filter_is_a_400_not_a_crash(snapshots):
    _, a, _, _ = snapshots
    with BackgroundServer(ServerConfig(a, allow_no_auth=True)) as s:  # the default limit: 2000 characters
        deep = "(" * 900 + "language:en" + ")" * 900
        status, out, _ = call(s, "/v1/retrieve", {"history": [], "filter": deep, "k": 3})
        assert status == 400 and out["error"]["code"] == "bad_filter" and "nests deeper" in out["error"]["message"], out
        assert 0 < out["error"]["position"] <= 900
        status, out, _ = call(s, "/v1/retrieve", {"history": [], "filter": "(" * 20 + "language:en" + ")" * 20, "k": 3})
        assert status == 200 and out["ids"], out


def test_after_all_the_bad_input_the_server_answers_and_never_answered_500(server):
    assert call(server, "/healthz")[:2] == (200, {"status": "ok"})
    status, out, _ = call(server, "/v1/retrieve", {"history": history(server), "k": 3})
    assert status == 200 and len(out["ids"]) == 3
    text = call(server, "/metrics")[1]
    counts = {
        line.split("{")[1].split("}")[0]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("sterling_requests_total{")
    }
    assert any('status="400"' in k for k in counts) and any('status="422"' in k for k in counts)
    assert any('status="413"' in k for k in counts)
    assert not [k for k in counts if 'status="5' in k], counts


# ---- auth ----------------------------------------------------------------------------------------


def test_write_endpoints_need_the_token(server, snapshots):
    _, a, _, _ = snapshots
    body = {"delete": [123]}
    for token in (None, "wrong", TOKEN + "x"):
        status, out, headers = call(server, "/v1/items", body, token=token)
        assert status == 401 and out["error"]["code"] == "unauthorized" and headers["WWW-Authenticate"] == "Bearer"
        assert call(server, "/v1/admin/reload", {"path": str(a)}, token=token)[0] == 401
    assert call(server, "/v1/items", body, token=TOKEN)[0] == 200
    assert call(server, "/v1/snapshot")[0] == 200 and call(server, "/v1/retrieve", {"history": [], "k": 1})[0] == 200


def test_a_server_without_a_token_refuses_to_start_unless_told_to(snapshots):
    _, a, _, _ = snapshots
    with pytest.raises(ValueError, match="bearer token"):
        ServerConfig(a)
    with BackgroundServer(ServerConfig(a, allow_no_auth=True)) as s:
        assert call(s, "/v1/items", {"delete": [1]})[0] == 200
        s.service.batcher.close()  # the model thread stops: the server is no longer ready
        status, out, _ = call(s, "/readyz")
        assert status == 503 and out["ready"] is False
        assert call(s, "/healthz")[0] == 200


# ---- hot swap and live updates under load ---------------------------------------------------------


async def _retrieve_many(url: str, bodies: list[dict], concurrency: int) -> list[tuple[int, dict]]:
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as session:

        async def one(body):
            async with gate, session.post(url + "/v1/retrieve", json=body) as r:
                return r.status, await r.json()

        return await asyncio.gather(*(one(b) for b in bodies))


def test_hot_swap_under_concurrent_requests_fails_no_request(server, snapshots):
    _, a, b, _ = snapshots
    versions = {}
    for path in (a, b):
        with open(path / "manifest.json", "rb") as f:
            versions[path] = __import__("hashlib").sha256(f.read()).hexdigest()[:16]
    assert versions[a] != versions[b] and server.service.info.version == versions[a]

    async def scenario():
        # 16 clients fire retrieves until the swaps are done (and at least 300 in all), each answer
        # stamped with when its request was sent and answered; the swaps A → B → A → B run meanwhile
        answers, done = [], asyncio.Event()

        async def client(session, c):
            i = c
            while not done.is_set() or len(answers) < 300:
                body = {
                    "history": history(server, 3 + i % 5, offset=i % 500),
                    "filter": [None, "language:en"][i % 2],
                    "k": 10,
                }
                sent = time.monotonic()
                async with session.post(server.url + "/v1/retrieve", json=body) as r:
                    out = await r.json()
                answers.append((sent, time.monotonic(), r.status, out))
                i += 16

        async def answered_since(t: float, n: int = 16) -> None:
            """Until n requests sent after t are answered (the next swap waits for them, not a clock)."""
            deadline = time.monotonic() + 60
            while sum(sent > t for sent, *_ in answers) < n:
                assert time.monotonic() < deadline, "the server stopped answering"
                await asyncio.sleep(0.005)

        loop = asyncio.get_running_loop()
        swaps = []  # (path, started, acknowledged, status)
        async with aiohttp.ClientSession() as session:
            load = asyncio.gather(*(client(session, c) for c in range(16)))
            await answered_since(time.monotonic())
            for path in (b, a, b):
                started = time.monotonic()
                status = (
                    await loop.run_in_executor(
                        None, lambda p=path: call(server, "/v1/admin/reload", {"path": str(p)}, token=TOKEN)
                    )
                )[0]
                swaps.append((path, started, time.monotonic(), status))
                await answered_since(swaps[-1][2])
            done.set()
            await load
        return answers, swaps

    answers, swaps = asyncio.run(scenario())
    assert [s[3] for s in swaps] == [200, 200, 200]
    assert len(answers) >= 300
    assert all(status == 200 for *_, status, _ in answers), [a for a in answers if a[2] != 200][:3]
    assert {out["snapshot"] for *_, out in answers} <= set(versions.values())
    # a request sent after a swap was acknowledged and answered before the next one began was
    # answered by that swap's model (the first window: A, before any swap); each window holds >= 16
    windows = [(a, float("-inf"))] + [(path, acked) for path, _, acked, _ in swaps]
    starts = [started for _, started, _, _ in swaps] + [float("inf")]
    for (path, since), until in zip(windows, starts):
        between = [out["snapshot"] for sent, received, _, out in answers if since < sent and received < until]
        assert len(between) >= 16 and set(between) == {versions[path]}, (path, set(between))
    assert server.service.info.version == versions[b] == call(server, "/v1/snapshot")[1]["version"]
    text = call(server, "/metrics")[1]
    assert f'sterling_snapshot_info{{path="{b}",version="{versions[b]}"}} 1.0' in text
    assert 'sterling_reloads_total{result="swapped"}' in text
    call(server, "/v1/admin/reload", {"path": str(a)}, token=TOKEN)
    assert call(server, "/v1/snapshot")[1]["version"] == versions[a]


def test_acknowledged_updates_are_visible_under_load_across_a_swap_and_a_compaction(server, snapshots):
    _, a, b, _ = snapshots
    base = 10**13

    def upsert(i):
        vector = torch.nn.functional.normalize(torch.randn(64), dim=0).tolist()
        body = {
            "upsert": [
                {
                    "id": base + i,
                    "embedding": vector,
                    "attributes": {"category": "music", "creator": 7 * 10**8 + i, "year": 2001},
                }
            ]
        }
        return call(server, "/v1/items", body, token=TOKEN)[0]

    async def scenario():
        bodies = [{"history": history(server, 5, offset=i), "k": 10} for i in range(200)]
        load = asyncio.create_task(_retrieve_many(server.url, bodies, 8))
        loop = asyncio.get_running_loop()
        acked, deleted, compacted = [], [], {}
        for i in range(24):
            if await loop.run_in_executor(None, upsert, i) == 200:
                acked.append(i)
            if i == 8:
                await loop.run_in_executor(
                    None, lambda: call(server, "/v1/admin/reload", {"path": str(b)}, token=TOKEN)
                )
            if i == 16:
                status, compacted, _ = await loop.run_in_executor(
                    None, lambda: call(server, "/v1/admin/compact", token=TOKEN, method="POST")
                )
                assert status == 200 and compacted["compacted"], compacted
            if i % 4 == 3:
                victim = acked.pop(0)
                status = (
                    await loop.run_in_executor(
                        None, lambda v=victim: call(server, "/v1/items", {"delete": [base + v]}, token=TOKEN)
                    )
                )[0]
                (deleted if status == 200 else acked).append(victim)
        return await load, acked, deleted, compacted

    answers, acked, deleted, compacted = asyncio.run(scenario())
    assert all(status == 200 for status, _ in answers)  # none failed during the swap or the compaction
    assert len(acked) == 18 and len(deleted) == 6
    for i in acked + deleted:
        status, out, _ = call(server, "/v1/retrieve", {"history": [], "filter": f"creator:{7 * 10**8 + i}", "k": 5})
        assert status == 200 and out["ids"] == ([base + i] if i in acked else []), (i, out)
    status, info, _ = call(server, "/v1/snapshot")
    assert info["path"] == compacted["snapshot"] and Path(info["path"]).parent == b.parent
    assert 0 < info["fresh_items"] < len(acked)  # those upserted since the compaction
    call(server, "/v1/admin/reload", {"path": str(a)}, token=TOKEN)
    for i in acked[:3]:  # still there after swapping back: the update log is applied to every snapshot
        assert call(server, "/v1/retrieve", {"history": [], "filter": f"creator:{7 * 10**8 + i}", "k": 5})[1][
            "ids"
        ] == [base + i]


def test_concurrent_requests_are_batched_and_a_bad_one_fails_alone(server):
    bodies = [{"history": history(server, 4, offset=i), "k": 5} for i in range(40)]
    bodies[7]["history"] = [123456789012]
    bodies[21]["history"] = [123456789012]
    answers = asyncio.run(_retrieve_many(server.url, bodies, 40))
    assert [s for s, _ in answers].count(400) == 2 and answers[7][0] == answers[21][0] == 400
    assert "unknown item ids" in answers[7][1]["error"]["message"]
    sizes = [out["timing_ms"]["batch_size"] for status, out in answers if status == 200]
    assert max(sizes) > 1 and max(sizes) <= 8


def test_a_batch_of_good_and_bad_requests_answers_each_on_its_own(snapshots):
    """max_batch 8, max_wait_ms 20: with the model thread held until 40 requests wait, they run as
    five batches of 8; the bad ones (an unknown history item, an unknown feature) fail alone."""
    _, a, _, _ = snapshots
    with BackgroundServer(ServerConfig(a, allow_no_auth=True, batcher=BatcherConfig(max_batch=8, max_wait_ms=20))) as s:
        batcher = s.service.batcher
        run_batch, opened, batches = batcher._run_batch, threading.Event(), []

        def gated(key, queries, waited):
            if not opened.is_set():  # the opener's batch holds the model thread until the rest are queued
                opened.set()
                deadline = time.monotonic() + 30
                while len(batcher) < 40 and time.monotonic() < deadline:
                    time.sleep(0.002)
            batches.append([(q.history, dict(q.features)) for q in queries])
            return run_batch(key, queries, waited)

        batcher._run_batch = gated
        ids = s.service.model.index.ids.tolist()
        bodies = [{"history": ids[i : i + 4], "k": 5} for i in range(40)]
        bodies[5]["history"] = [123456789012]
        bodies[22]["features"] = {"weather": 1}

        async def scenario():
            async with aiohttp.ClientSession() as session:

                async def one(body):
                    async with session.post(s.url + "/v1/retrieve", json=body) as r:
                        return r.status, await r.json()

                opener = asyncio.ensure_future(one({"history": ids[:2], "k": 5}))
                while not opened.is_set():
                    await asyncio.sleep(0.002)
                rest = asyncio.gather(*(one(b) for b in bodies))
                return await opener, await rest

        try:
            (status, _), answers = asyncio.run(scenario())
        finally:
            batcher._run_batch = run_batch
        assert status == 200
        assert [len(b) for b in batches] == [1, 8, 8, 8, 8, 8]
        bad = {5, 22}
        assert [i for i, (code, _) in enumerate(answers) if code != 200] == sorted(bad)
        assert answers[5][0] == 400 and "unknown item ids [123456789012]" in answers[5][1]["error"]["message"]
        assert answers[22][0] == 400 and "weather" in answers[22][1]["error"]["message"]
        mixed = [b for b in batches if ([123456789012], {}) in b or any("weather" in f for _, f in b)]
        assert len(mixed) in (1, 2) and all(len(b) == 8 for b in mixed)  # the bad ones shared batches with good ones
        # each answer is the model's for its batch (a mixed batch's good requests are answered one by one)
        model, got = s.service.model, {tuple(b["history"]): out for b, (_, out) in zip(bodies, answers)}
        for batch in batches[1:]:
            good = [(h, f) for h, f in batch if h != [123456789012] and "weather" not in f]
            runs = [good] if len(good) == len(batch) else [[g] for g in good]
            for run in runs:
                inputs = model.inputs([h for h, _ in run], None, [f for _, f in run])
                want = model(inputs, k=5, exclude=[h for h, _ in run]).ids
                for (h, _), row in zip(run, want):
                    assert got[tuple(h)]["ids"] == row[row != -1].tolist()
                    assert got[tuple(h)]["timing_ms"]["batch_size"] == len(run)
        assert sum(out["timing_ms"]["batch_size"] == 8 for code, out in answers if code == 200) >= 24
        text = call(s, "/metrics")[1]
        buckets = {
            line.split('le="')[1].split('"')[0]: float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("sterling_batch_size_bucket")
        }
        assert buckets["1.0"] >= 1 and buckets["8.0"] - buckets["4.0"] >= 5  # the histogram saw the batches of 8
