"""The update log: entries round-trip exactly and in order, a corrupt tail is dropped (never half
applied), a service replays it on start, and a server killed with SIGKILL comes back with every
acknowledged update."""

import asyncio
import http.client
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from sterling.serving.service import Service
from sterling.serving.update_log import Update, UpdateLog
from sterling.testing.snapshots import build_serving_snapshot

sys.path.insert(0, str(Path(__file__).parent))
from test_service import random_updates, state  # noqa: E402


def same(a: Update, b: Update) -> bool:
    def rows(u: Update) -> list:
        if isinstance(u.embeddings, torch.Tensor):
            return [e for e in u.embeddings]
        return list(u.embeddings)

    pairs = list(zip(rows(a), rows(b)))
    return (
        a.ids == b.ids
        and a.deletes == b.deletes
        and json.dumps(a.attributes) == json.dumps(b.attributes)
        and len(rows(a)) == len(rows(b))
        and all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y)) for x, y in pairs)
    )


@pytest.mark.parametrize("seed", range(4))
def test_entries_round_trip_exactly_in_order(tmp_path, seed):
    rng = random.Random(seed)
    updates = random_updates(rng, list(range(100)), 8)
    cold = Update([7, 8], [torch.randn(4), None], [{"year": 1}, {"genre": ["war"]}], [3])  # one embedded by the model
    updates.insert(rng.randrange(len(updates)), cold)
    log = UpdateLog(tmp_path / "log.sqlite")
    seqs = [log.append(u) for u in updates]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and log.last_seq == seqs[-1]
    log.close()
    log = UpdateLog(tmp_path / "log.sqlite")  # reopened, as after a restart
    got = log.entries()
    assert [s for s, _ in got] == seqs and all(same(u, g) for u, (_, g) in zip(updates, got))
    assert [s for s, _ in log.entries(after=seqs[2])] == seqs[3:]
    log.discard(seqs[1])
    assert log.base == (None, 0)
    log.fold(tmp_path / "compacted", seqs[3])
    assert [s for s, _ in log.entries()] == seqs[4:] and log.last_seq == seqs[-1]
    assert log.base == (tmp_path / "compacted", seqs[3])
    assert log.append(cold) == seqs[-1] + 1  # numbers are never reused
    log.close()


def test_a_corrupt_entry_ends_the_log(tmp_path):
    log = UpdateLog(tmp_path / "log.sqlite")
    updates = random_updates(random.Random(1), list(range(50)), 5)
    seqs = [log.append(u) for u in updates]
    db = sqlite3.connect(tmp_path / "log.sqlite")
    db.execute("UPDATE updates SET body = CAST(? AS BLOB) WHERE seq = ?", (b'{"ids":[1]', seqs[2]))  # bit rot
    db.commit()
    db.close()
    got = log.entries()
    assert [s for s, _ in got] == seqs[:2] and all(same(u, g) for u, (_, g) in zip(updates, got))
    db = sqlite3.connect(tmp_path / "log.sqlite")
    assert [r[0] for r in db.execute("SELECT seq FROM updates ORDER BY seq")] == seqs[:2]  # the tail is deleted
    db.close()
    assert log.append(updates[0]) == seqs[-1] + 1
    log.close()
    (tmp_path / "junk.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(ValueError, match="is not an update log"):
        UpdateLog(tmp_path / "junk.sqlite")


def test_a_service_replays_its_log_and_a_refused_update_is_not_logged(tmp_path):
    snapshot = build_serving_snapshot(tmp_path / "a", num_items=300, seed=1, k0=50)
    log_path = tmp_path / "log.sqlite"
    first = Service(snapshot, update_log=UpdateLog(log_path))
    try:
        ids = first.model.index.ids.tolist()
        updates = [
            Update(u.ids, u.embeddings, [{"year": a["year"]} for a in u.attributes], u.deletes)  # its features
            for u in random_updates(random.Random(2), ids, 6, dim=first.model.dim)
        ]
        for u in updates:
            asyncio.run(first.update(u))
        with pytest.raises(ValueError):  # wrong dimension: refused, and gone from the log
            asyncio.run(first.update(Update([5], torch.randn(1, first.model.dim + 1), [{}], [])))
        want = state(first.model)
        assert first.describe()["update_log"]["last_seq"] == len(updates) + 1
    finally:
        first.close()
        first.update_log.close()
    assert len(UpdateLog(log_path).entries()) == len(updates)
    again = Service(snapshot, update_log=UpdateLog(log_path))
    try:
        got = state(again.model)
        assert got["ids"] == want["ids"] and got["attrs"] == want["attrs"] and torch.equal(got["emb"], want["emb"])
        assert (
            again.describe()["update_log"]["applied_seq"] == len(updates) + 1
        )  # the refused one's number is not reused
    finally:
        again.close()
        again.update_log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, token: str) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, json.loads(r.read())


def _start(snapshot: Path, log_path: Path, port: int) -> subprocess.Popen:
    env = os.environ | {"STERLING_TOKEN": "t"}
    argv = [sys.executable, "-m", "sterling", "serve", "--snapshot", str(snapshot), "--log", str(log_path)]
    proc = subprocess.Popen([*argv, "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()  # printed once the port is bound and the model (and its log) loaded
    assert "serving" in line, line
    return proc


def test_acknowledged_updates_survive_sigkill(tmp_path):
    """Upserts and deletes, then SIGKILL without warning, twice: a restarted server answers every
    acknowledged write."""
    snapshot = build_serving_snapshot(tmp_path / "a", num_items=300, seed=1, k0=50)
    log_path, port = tmp_path / "log.sqlite", _free_port()
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(3)
    upserted: dict[int, list[float]] = {}
    deleted: set[int] = set()
    for round_ in range(2):
        proc = _start(snapshot, log_path, port)
        try:
            for i in range(10):
                new = 10**9 + 10 * round_ + i
                emb = [rng.gauss(0, 1) for _ in range(64)]
                doomed = [new - 1] if i % 3 == 2 else []
                status, _ = _post(url + "/v1/items", {"upsert": [{"id": new, "embedding": emb}], "delete": doomed}, "t")
                assert status == 200
                upserted[new] = emb
                deleted |= set(doomed)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        time.sleep(0.1)
    service = Service(snapshot, update_log=UpdateLog(log_path))
    try:
        live = set(service.model.index.ids.tolist())
        assert set(upserted) - deleted <= live and not deleted & live
        kept = sorted(set(upserted) - deleted)
        got = service.model.index.embeddings_of(kept)
        want = torch.tensor([upserted[i] for i in kept])
        torch.testing.assert_close(got.float(), want, rtol=0, atol=0.02)  # the index's int8 codes
    finally:
        service.close()
        service.update_log.close()


def test_twenty_sigkills_at_random_moments_lose_no_acknowledged_write(tmp_path):
    """A writer thread sends two-item upserts and deletes while the main thread kills the server
    (SIGKILL) at random moments, 20 times, every other time while a compaction (``POST
    /v1/admin/compact``) runs; each restart, on the snapshot it was first started on, serves it with
    the log (and what the compactions folded). In the end every acknowledged write holds, and a
    write cut off by a kill is whole or absent, never half-applied."""
    snapshot = build_serving_snapshot(tmp_path / "a", num_items=200, seed=2, k0=50)
    log_path, port = tmp_path / "log.sqlite", _free_port()
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(5)
    live_ack: set[int] = set()  # pairs (by first id) upserted and acknowledged, not deleted since
    deleted_ack: set[int] = set()
    cut_off: list[int] = []  # pairs whose write was sent when a kill came: whole or absent
    state = {"next_id": 10**12, "acked": 0}

    def writer(stop: threading.Event) -> None:
        wrng = random.Random(rng.random())
        while not stop.is_set():
            if live_ack and wrng.random() < 0.3:
                first = wrng.choice(sorted(live_ack))
                body = {"delete": [first, first + 1]}
            else:
                first = state["next_id"]
                state["next_id"] += 2
                body = {
                    "upsert": [{"id": first + j, "embedding": [wrng.gauss(0, 1) for _ in range(64)]} for j in (0, 1)]
                }
            try:
                status, _ = _post(url + "/v1/items", body, "t")
            except (OSError, http.client.HTTPException):  # refused, reset, or the answer cut short
                cut_off.append(first)
                return
            assert status == 200
            state["acked"] += 1
            if "delete" in body:
                live_ack.discard(first)
                deleted_ack.add(first)
            else:
                live_ack.add(first)

    compactions = {"answered": 0, "cut off": 0}

    def compactor(answered: threading.Event) -> None:
        try:
            status, _ = _post(url + "/v1/admin/compact", {}, "t")
        except (OSError, http.client.HTTPException):
            return
        assert status == 200
        answered.set()

    for kill in range(20):
        proc = _start(snapshot, log_path, port)
        stop = threading.Event()
        thread = threading.Thread(target=writer, args=(stop,))
        thread.start()
        time.sleep(rng.uniform(0.05, 0.6))
        if kill % 2:  # kill while a compaction runs (or just after it)
            answered = threading.Event()
            compacting = threading.Thread(target=compactor, args=(answered,))
            compacting.start()
            time.sleep(rng.uniform(0.0, 0.8))  # a compaction here takes about 0.3 s
        proc.send_signal(signal.SIGKILL)  # while the writer is mid-stream
        proc.wait()
        stop.set()
        thread.join()
        if kill % 2:
            compacting.join()
            compactions["answered" if answered.is_set() else "cut off"] += 1
    service = Service(snapshot, update_log=UpdateLog(log_path))
    try:
        live = set(service.model.index.ids.tolist())
        for first in live_ack - set(cut_off):
            assert {first, first + 1} <= live, first  # acknowledged and not deleted since: present
        for first in deleted_ack - set(cut_off):
            assert not {first, first + 1} & live, first  # acknowledged deletes: absent
        for first in cut_off:
            assert len({first, first + 1} & live) in (0, 2), first  # whole or absent
        assert state["acked"] > 20 and cut_off
        assert compactions["answered"] and compactions["cut off"]  # some folded, some killed midway
        print(
            f"20 kills, {compactions['cut off']} during a compaction ({compactions['answered']} compactions "
            f"done), {state['acked']} acknowledged writes, {len(cut_off)} cut off by a kill, 0 lost"
        )
    finally:
        service.close()
        service.update_log.close()
