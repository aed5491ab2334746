"""``sterling bench retrieval`` on a tiny configuration: most-popular, the four two-tower rows and the
served HSTU / SASRec rows with the documented keys, recalls that are fractions and agree with an
independent count, the cached ranking equal to recomputing, and sequence training data that never
sees a held-out request."""

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sterling.bench.retrieval import (
    KS,
    ROWS,
    SEQUENCE_ROWS,
    TWO_TOWER_ROWS,
    HeldOut,
    RetrievalBenchConfig,
    default_formula,
    format_table,
    most_popular,
    run,
    shown_quality,
    truncated_dataset,
)
from sterling.data.items import read_items
from sterling.data.synth import SynthConfig, generate
from sterling.train.loop import TrainConfig
from sterling.train.metrics import task_metrics
from sterling.train.overarch import OverArchTrainConfig
from sterling.train.retrieval import RetrievalConfig
from sterling.train.split import holdout_requests

TINY = RetrievalBenchConfig(
    synth=replace(SynthConfig(), num_users=50, num_items=300, requests_per_user=(2, 4), seed=4),
    train=TrainConfig(epochs=1, dim=16, hidden=32, overarch=OverArchTrainConfig(epochs=1, hidden=32)),
    sequence=RetrievalConfig(dim=8, num_layers=1, max_len=20, epochs=2, batch_size=16, num_negatives=8),
    seeds=(0, 1),
    k0=500,
    batch=16,
    rank_candidates=20,
)
KEYS = [f"recall@{k}{tail}" for tail in ("", "_unseen") for k in KS]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(TINY.synth, tmp_path_factory.mktemp("bench-retrieval") / "data")


def test_rows_ranking_and_table():
    result = run(TINY, log=lambda s: None)
    rows = result["rows"]
    assert [r["row"] for r in rows] == list(ROWS) and {r["dataset"] for r in rows} == {"synthetic"}
    assert len({r["requests"] for r in rows}) == 1 and rows[0]["requests"] > 0  # the same held-out requests
    for r in rows:
        assert {"row", "dataset", "qps", *KEYS, *(f"{k}_se" for k in KEYS)} <= set(r)
        assert all(0.0 <= r[key] <= 1.0 for key in KEYS)
        for tail in ("", "_unseen"):  # recall grows with K
            assert [r[f"recall@{k}{tail}"] for k in KS] == sorted(r[f"recall@{k}{tail}"] for k in KS)
        assert r["qps"] is None if r["row"] == "most_popular" else r["qps"] > 0
    # with 300 items every row ranks the whole catalogue by K = 500: all engaged items are found
    assert all(r["recall@500"] == 1.0 for r in rows)
    by_row = {r["row"]: r for r in rows}
    assert by_row["overarch_vm"]["value_formula"] == default_formula(("click", "like", "share"))
    assert default_formula(("click", "like", "share")) == "click + 0.5*like + 0.25*share"
    for name in SEQUENCE_ROWS:
        r = by_row[name]
        assert r["seeds"] == [0, 1] and [s["seed"] for s in r["per_seed"]] == [0, 1]
        assert r["config"]["encoder"] == name and r["config"]["epochs"] == TINY.sequence.epochs
        for key in KEYS:
            values = [s[key] for s in r["per_seed"]]
            assert r[key] == pytest.approx(np.mean(values))
            assert r[f"{key}_se"] == pytest.approx(np.std(values, ddof=1) / np.sqrt(2))
    assert all(by_row[r][f"{k}_se"] is None for r in ("most_popular", "exact") for k in KEYS)
    assert {(g["dataset"], g["row"]) for g in result["relative"]} == {("synthetic", n) for n in SEQUENCE_ROWS}
    for shown in (by_row["overarch"]["shown"], *(s["shown"] for s in by_row["hstu+ranker"]["per_seed"])):
        assert set(shown) == {"auc", "gauc", "ne"} and all(set(m) == {"click", "like", "share"} for m in shown.values())
        assert all(0.0 <= v <= 1.0 for v in shown["auc"].values() if not np.isnan(v))
    (ranking,) = result["ranking"]
    assert ranking["identical"] and ranking["max_abs_diff"] == 0.0 and ranking["cached_qps"] > 0
    assert {"platform", "cpus", "torch"} <= set(result["machine"])
    table = format_table(result)
    assert all(row in table for row in ROWS) and "identical" in table and "±" in table and "exclude_seen" in table
    assert "synthetic      click    overarch " in table


def test_shown_quality_scores_each_request_s_impressions_as_a_loop_would():
    """Requests of different sizes padded into one ``rank`` call: the metrics are those of each
    request's own impressions, grouped by request."""

    class Scorer:
        config = SimpleNamespace(tasks=("click", "like"))

        def rank(self, inputs, ids):  # [B, M] -> [B, M, 2], a fixed function of the id
            return torch.stack([torch.sigmoid(ids / 7.0 - 3), torch.sigmoid(2 - ids / 5.0)], -1)

    rng = np.random.default_rng(0)
    shown = [rng.choice(40, n, replace=False).astype(np.int64) for n in (3, 1, 6, 2, 5)]
    labels = [(rng.random((len(s), 2)) < 0.5).astype(np.float32) for s in shown]
    held = HeldOut(
        [SimpleNamespace()] * 2, [slice(0, 3), slice(3, 5)], [], np.zeros(5), np.zeros(5), [], [], [], shown, labels
    )
    got = shown_quality(Scorer(), held)
    ids = torch.from_numpy(np.concatenate(shown)).float()
    logits = torch.stack([ids / 7.0 - 3, 2 - ids / 5.0], -1)
    groups = torch.cat([torch.full((len(s),), r) for r, s in enumerate(shown)])
    want = task_metrics(logits, torch.from_numpy(np.concatenate(labels)), groups, ("click", "like"))
    for metric in want:
        for task in want[metric]:
            assert got[metric][task] == pytest.approx(want[metric][task], rel=1e-4, nan_ok=True), (metric, task)


def test_sequence_rows_pick_the_sequence_models_run():
    result = run(replace(TINY, sequence_rows=("sasrec",)), log=lambda s: None)
    assert [r["row"] for r in result["rows"]] == ["most_popular", *TWO_TOWER_ROWS, "sasrec"]
    with pytest.raises(ValueError, match="sequence_rows must be a non-empty subset"):
        replace(TINY, sequence_rows=("hstu", "bert4rec"))


def test_most_popular_is_the_training_engagement_count_and_deterministic(data):
    item_ids, _, _ = read_items(data / "items.parquet")
    ranked = most_popular(data, item_ids, 0)
    assert np.array_equal(ranked, most_popular(data, item_ids, 0))
    assert sorted(ranked.tolist()) == sorted(item_ids.tolist())
    # an independent count: clicks of every request but the held-out ones, ties by catalogue row
    held = set(holdout_requests(data / "requests.parquet").tolist())
    counts = dict.fromkeys(item_ids.tolist(), 0)
    for request in pq.read_table(data / "requests.parquet").to_pylist():
        if request["request_id"] not in held:
            for imp in request["impressions"]:
                counts[imp["item_id"]] += imp["click"]
    row = {int(i): r for r, i in enumerate(item_ids)}
    assert ranked.tolist() == sorted(counts, key=lambda i: (-counts[i], row[i]))


def test_the_sequence_training_data_stops_before_each_held_out_request(data, tmp_path):
    requests = pq.read_table(data / "requests.parquet").to_pylist()
    held = set(holdout_requests(data / "requests.parquet").tolist())
    last = {r["user_id"]: r for r in requests if r["request_id"] in held}
    users = np.array(sorted(last), dtype=np.int64)
    cut = truncated_dataset(data, tmp_path / "cut", users, np.array([last[u]["ts"] for u in users]))
    assert sorted(p.name for p in cut.iterdir()) == ["items.parquet", "users.parquet"]
    before = {u["user_id"]: u for u in pq.read_table(data / "users.parquet").to_pylist()}
    after = {u["user_id"]: u for u in pq.read_table(cut / "users.parquet").to_pylist()}
    assert pq.read_schema(cut / "users.parquet").metadata == pq.read_schema(data / "users.parquet").metadata
    assert before.keys() == after.keys()
    dropped = 0
    for user, old in before.items():
        new = after[user]
        if user not in last:  # not evaluated: the whole timeline
            assert new == old
            continue
        ts = last[user]["ts"]
        events = list(zip(old["timeline_item_id"], old["timeline_action"], old["timeline_ts"]))
        kept = list(zip(new["timeline_item_id"], new["timeline_action"], new["timeline_ts"]))
        assert kept == [e for e in events if e[2] < ts]  # exactly the history of the held-out request
        engaged = {imp["item_id"] for imp in last[user]["impressions"] if imp["click"]}
        # an engaged item is in the training sequence only when the user engaged with it before
        only_then = engaged - {e[0] for e in events if e[2] < ts}
        assert not only_then & set(new["timeline_item_id"])
        dropped += len(events) - len(kept)
    assert dropped > 0  # the held-out requests' clicks were in the timelines
