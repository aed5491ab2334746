"""``sterling bench stack``: the conventional stack's services on a tiny catalogue — the filtering
service's rows are sterling's exact filter, the front's answers at full nprobe are the model's exact
filtered answers, bad input to each service answers a 4xx JSON error — and a tiny ``--quick`` run
that gives both stacks' rows and summaries."""

import json
import random
import socket
import urllib.error
import urllib.request
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("aiohttp")
pytest.importorskip("faiss")

from sterling.bench.stack import StackBenchConfig, _Service  # noqa: E402
from sterling.bench.stack_probe import exact_answers, recall_at_k, smallest_reaching  # noqa: E402
from sterling.bench.stack_wire import Pieces, pack, unpack  # noqa: E402
from sterling.index.item_index import IndexConfig  # noqa: E402
from sterling.testing.snapshots import build_serving_snapshot, request_mix  # noqa: E402

NLIST = 16


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("stack") / "snap"
    return build_serving_snapshot(path, num_items=1500, k0=50, index_config=IndexConfig(nlist=NLIST))


@pytest.fixture(scope="module")
def pieces(snapshot):
    return Pieces.load(snapshot, keep_index=True)


@pytest.fixture(scope="module")
def services(snapshot, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    started = [
        _Service(role, snapshot, logs / f"{role}.log", 1, *extra)
        for role, extra in (("filter", ()), ("ann", ("--nlist", str(NLIST))), ("ranking", ()))
    ]
    try:
        urls = {s.role: s.wait().url for s in started}
        front = _Service(
            "front", snapshot, logs / "front.log", 1, "--nprobe", str(NLIST),
            "--filter-url", urls["filter"], "--ann-url", urls["ann"], "--ranking-url", urls["ranking"],
        )  # fmt: skip
        started.append(front)
        urls["front"] = front.wait().url
        yield urls
    finally:
        for s in started:
            s.stop()


def _post(url: str, body: object, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _passing(result: dict, n: int) -> set[int]:
    if "rows" in result:
        return set(unpack(result["rows"], "int32", 1).tolist())
    bits = np.unpackbits(unpack(result["bitmap"], "uint8", 1), count=n, bitorder="little")
    return set(np.flatnonzero(bits).tolist())


def test_arrays_cross_the_wire_unchanged():
    for a in (np.arange(12, dtype=np.int64).reshape(3, 4) - 5, np.random.rand(2, 3).astype(np.float32)):
        assert np.array_equal(unpack(json.loads(json.dumps(pack(a))), str(a.dtype)), a)
    with pytest.raises(ValueError, match="dtype"):
        unpack(pack(np.zeros(3, np.float32)), "int64")
    with pytest.raises(ValueError, match="values for the shape"):
        unpack({**pack(np.zeros(3, np.float32)), "shape": [4]}, "float32")


def test_the_filtering_service_passes_the_rows_of_sterlings_exact_filter(services, pieces):
    rng = random.Random(3)
    filters = [r["filter"] for r in request_mix(pieces.model, 80, seed=5) if r["filter"]]
    filters = rng.sample(filters, 25) + ["creator:1000", "year >= 2024 AND kids:1", "category:nonexistent"]
    status, body = _post(services["filter"] + "/v1/filter", {"filters": [*filters, None]})
    assert status == 200 and body["results"][-1] is None
    n = len(pieces.ids)
    probe = torch.randn(1, pieces.dim)
    for flt, result in zip(filters, body["results"]):
        # sterling's own filtered search over every list with k = N answers exactly the passing items
        ids = pieces.index.search(probe, k=n, filter=flt, nprobe=NLIST).ids[0]
        want = set(pieces.rows_of(ids[ids >= 0].numpy()).tolist())
        assert result["count"] == len(want) and _passing(result, n) == want, flt
    assert any("rows" in r for r in body["results"][:-1]) and any("bitmap" in r for r in body["results"][:-1])


def test_the_stacks_answers_at_full_nprobe_are_the_models_exact_filtered_answers(services, pieces):
    mix = request_mix(pieces.model, 12, seed=1)
    mix[0] = {**mix[0], "filter": "creator:1001"}  # a rare filter: fewer than K0 pass
    mix[1] = {**mix[1], "exclude_seen": False}
    exact = exact_answers(pieces, mix)
    got = []
    for r in mix:
        status, body = _post(services["front"] + "/v1/retrieve", r)
        assert status == 200, body
        assert set(body["timing_ms"]) >= {"queue", "user_tower", "filter", "ann", "ranking", "total", "batch_size"}
        assert len(body["ids"]) == len(body["scores"]) <= r["k"]
        if r.get("exclude_seen", True):
            assert not set(body["ids"]) & set(r["history"])
        got.append(body["ids"])
    # FAISS SQ8 at nprobe = nlist differs from the float scores only by its 8-bit rounding: the same
    # answers but for a near tie at the K0 boundary
    assert recall_at_k(got, exact) >= 0.98
    assert sum(g == e for g, e in zip(got, exact)) >= len(mix) - 2
    assert got[0] == exact[0]  # fewer than K0 pass: the candidates are every passing item


def test_the_ann_service_at_full_nprobe_finds_the_exact_filtered_top_k0(services, pieces):
    mix = request_mix(pieces.model, 6, seed=2)
    with torch.no_grad():
        _, queries = pieces.model.encode(pieces.inputs([r["history"] for r in mix]))
    status, body = _post(services["filter"] + "/v1/filter", {"filters": [r["filter"] for r in mix]})
    requests = [{"queries": pack(q.numpy()), "allowed": a} for q, a in zip(queries, body["results"])]
    status, body = _post(services["ann"] + "/v1/search", {"k": 50, "nprobe": NLIST, "requests": requests})
    assert status == 200
    rows = unpack(body["rows"], "int64", 3)
    vectors = pieces.float_vectors
    hits = total = 0
    for r, q, got in zip(mix, queries, rows):
        allowed = torch.ones(len(vectors), dtype=torch.bool)
        if r["filter"]:
            allowed = pieces.index._state.main.attributes.evaluate_filter(r["filter"])
        assert allowed[torch.from_numpy(got[got >= 0])].all()  # never a failing item
        scores = (q @ vectors.T).masked_fill(~allowed, float("-inf"))
        want = scores.topk(50, dim=1)
        for w, v, g in zip(want.indices.tolist(), want.values.tolist(), got.tolist()):
            w = {i for i, s in zip(w, v) if s > float("-inf")}
            hits, total = hits + len(w & set(g)), total + len(w)
    assert hits / total >= 0.98


BAD = {
    "filter": [("/v1/filter", {}), ("/v1/filter", {"filters": "year > 1"})],
    "ann": [
        ("/v1/search", {"k": 5, "requests": [{"queries": [[0.0] * 64]}]}),
        ("/v1/search", {"k": 0, "requests": []}),
        ("/v1/search", {"k": 5, "nprobe": 10**6, "requests": []}),
        ("/v1/search", {"k": 5, "requests": [{"queries": pack(np.zeros((3, 7), np.float32))}]}),
    ],
    "ranking": [
        ("/v1/rank", {"histories": [[1]]}),
        (
            "/v1/rank",
            {"histories": [], "users": pack(np.zeros((1, 64), np.float32)), "queries": {}, "rows": {}, "k": []},
        ),
    ],
    "front": [
        ("/v1/retrieve", {"history": [1, 2, 3], "k": 10}),  # unknown item ids
        ("/v1/retrieve", {"history": [], "k": 0}),
        ("/v1/retrieve", {"history": [], "k": 10, "filter": "colour:red"}),  # an unknown feature
        ("/v1/retrieve", {"history": [], "k": 10, "filter": "year >>"}),  # malformed
        ("/v1/retrieve", {"history": "x"}),
        ("/v1/retrieve", {"history": [], "shoe": 1}),
    ],
}


@pytest.mark.parametrize("role", sorted(BAD))
def test_bad_input_to_each_service_answers_a_4xx_json_error(services, role):
    url = services[role]
    for path, body in BAD[role]:
        status, answer = _post(url + path, body)
        assert 400 <= status < 500 and set(answer["error"]) == {"code", "message"}, (path, body, answer)
    status, answer = _post(url + BAD[role][0][0], None, raw=b"{not json")
    assert status == 400 and answer["error"]["code"] == "bad_request"
    status, answer = _post(url + "/v1/nowhere", {})
    assert status == 404 and "error" in answer
    if role == "filter":  # a bad filter is that filter's error, the others still pass
        status, answer = _post(url + "/v1/filter", {"filters": ["year >>", "year > 2000", 3]})
        assert status == 200 and "error" in answer["results"][0] and "count" in answer["results"][1]
        assert "error" in answer["results"][2]


def test_a_tiny_quick_run_gives_both_stacks_rows_and_summaries(tmp_path, monkeypatch, capsys):
    from sterling.cli import main

    tiny = replace(StackBenchConfig.quick(), rates=(15, 30), step_seconds=1.0, mix_size=40, recall_requests=8)
    monkeypatch.setattr(StackBenchConfig, "quick", classmethod(lambda cls: tiny))
    out, png = tmp_path / "stack.json", tmp_path / "stack.png"
    argv = ["bench", "stack", "--quick", "--items", "1200", "--threads", "1", "--json", str(out), "--plot", str(png)]
    assert main([*argv, "--snapshots", str(tmp_path / "snaps"), "--rates", "50,20", "--step-seconds", "2"]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["rates"] == [20.0, 50.0] and result["config"]["step_seconds"] == 2.0
    assert png.stat().st_size > 0 and str(png) in capsys.readouterr().out
    assert {r["mode"] for r in result["rows"]} == {"sterling", "conventional"}
    for r in result["rows"]:
        assert r["achieved_qps"] > 0 and r["p50_ms"] > 0 and r["errors"] == 0
        assert r["cpu_s_per_request"] > 0 and r["rss_mb"] > 50
    for name, stages in (
        ("sterling", {"user_tower", "ann", "overarch"}),
        ("conventional", {"filter", "ann", "ranking"}),
    ):
        s = result["stacks"][name]
        assert set(s["stages_ms"]) >= stages and s["max_qps_at_p99_budget"] >= 0
        assert 0.9 <= s["recall_at_k"] <= 1.0 and s["rss_mb"] > 0 and s["cpu_s_per_request"] > 0
    for flag, bad in (("--rates", "20,x"), ("--rates", "0,20"), ("--step-seconds", "0")):
        assert main(["bench", "stack", "--quick", flag, bad]) == 2
        assert flag in capsys.readouterr().err
    tuning = result["stacks"]["conventional"]["tuning"]
    reached = tuning["faiss"][str(tuning["nprobe"])] >= tuning["sterling"]
    assert reached or tuning["nprobe"] == result["stacks"]["conventional"]["nlist"]
    if reached and tuning["nprobe"] > 1:  # the smallest that reaches it: one fewer list falls short
        assert tuning["faiss"][str(tuning["nprobe"] - 1)] < tuning["sterling"]


@given(st.integers(1, 5000), st.integers(1, 5000))
def test_nprobe_tuning_finds_the_smallest_reaching_nprobe(nlist, threshold):
    calls = []

    def reaches(nprobe):
        assert 1 <= nprobe <= nlist
        calls.append(nprobe)
        return nprobe >= threshold

    got = smallest_reaching(reaches, nlist)
    assert got == min(threshold, nlist)
    assert len(calls) <= 2 * max(1, nlist.bit_length()) + 1


def test_a_failing_downstream_service_is_a_502_with_a_json_body(services, snapshot, tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    front = _Service(
        "front", snapshot, tmp_path / "front.log", 1, "--nprobe", str(NLIST),
        "--filter-url", services["filter"], "--ann-url", services["ann"], "--ranking-url", dead,
    )  # fmt: skip
    try:
        status, body = _post(front.wait().url + "/v1/retrieve", {"history": [], "k": 5})
    finally:
        front.stop()
    assert status == 502 and body["error"]["code"] == "upstream_error"
    assert "ranking service" in body["error"]["message"]
