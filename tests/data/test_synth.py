"""Synthetic request logs (sterling.data.synth)."""

import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from sterling.data.group import join_users
from sterling.data.items import read_items
from sterling.data.schema import read_roles, validate_items, validate_requests, validate_users
from sterling.data.synth import CATEGORIES, SynthConfig, generate, simulate

SMALL = SynthConfig(num_users=80, num_items=600, requests_per_user=(2, 12), seed=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(SMALL, tmp_path_factory.mktemp("synth"))


def _auc(score: np.ndarray, label: np.ndarray) -> float:
    ranks = np.argsort(np.argsort(score)) + 1.0
    positives = label.sum()
    return (ranks[label].sum() - positives * (positives + 1) / 2) / (positives * (len(label) - positives))


def test_deterministic(data, tmp_path):
    again = generate(SMALL, tmp_path / "again")
    for name in ("requests", "users", "items"):
        assert pq.read_table(data / f"{name}.parquet").equals(pq.read_table(again / f"{name}.parquet"))
    other = simulate(SynthConfig(num_users=80, num_items=600, requests_per_user=(2, 12), seed=5))
    assert not np.array_equal(other.impressions["item_id"][:50], simulate(SMALL).impressions["item_id"][:50])


def test_files_follow_the_contract(data):
    validate_requests(pq.read_schema(data / "requests.parquet"))
    validate_users(pq.read_schema(data / "users.parquet"))
    validate_items(pq.read_schema(data / "items.parquet"))
    roles = read_roles(pq.read_schema(data / "requests.parquet"))
    assert roles.labels == ("click", "like", "share") and roles.context == ("surface", "hour")
    ids, attributes, display = read_items(data)
    assert len(ids) == SMALL.num_items and len(display["title"]) == SMALL.num_items
    assert all(
        a["category"] in CATEGORIES and 1 <= len(a["region"]) <= 3 and 1 <= len(a["tags"]) <= 4 for a in attributes
    )
    assert all(1960 <= a["year"] <= 2025 and isinstance(a["creator"], int) for a in attributes)
    own_tag = np.mean([any(t.startswith(a["category"] + "-") for t in a["tags"]) for a in attributes])
    assert own_tag > 0.8  # tags follow the category


def test_labels_are_correlated_and_follow_affinity():
    log = simulate(SMALL)
    click, like, share = (log.impressions[k].astype(bool) for k in ("click", "like", "share"))
    assert not (like & ~click).any() and not (share & ~like).any()
    assert 0.05 < click.mean() < 0.5 and like[click].mean() > like.mean() and share[like].mean() > share.mean()
    assert _auc(log.affinity, click) > 0.6
    position = log.impressions["position"]
    assert click[position == 0].mean() > click[position >= 10].mean()


def test_timeline_sorted_and_history_never_leaks(data):
    users = pq.read_table(data / "users.parquet")
    for row in users.slice(0, 40).to_pylist():
        keys = list(zip(row["timeline_ts"], row["timeline_item_id"]))
        assert keys == sorted(keys) and len(set(map(len, (row["timeline_ts"], row["timeline_action"])))) == 1
    timelines = {r["user_id"]: np.array(r["timeline_ts"]) for r in users.to_pylist()}
    grew, pairs, previous = 0, 0, None
    for batch in join_users(data, batch_rows=64):
        for user, ts, length in zip(
            batch.requests.column("user_id").to_pylist(), batch.requests.column("ts").to_pylist(), batch.history_length
        ):
            history = timelines[user][:length]
            assert (history < ts).all() and (timelines[user][length:] >= ts).all()
            if previous is not None and previous[0] == user:
                pairs += 1
                grew += length > previous[1]
            previous = (user, length)
    assert grew > 0.5 * pairs  # later requests see earlier engagements


def test_default_size_and_speed():
    start = time.perf_counter()
    log = simulate(SynthConfig())
    assert time.perf_counter() - start < 20
    per_request = np.diff(log.impression_offsets)
    assert per_request.min() >= 1 and per_request.max() <= 100
    assert np.mean((per_request >= 5) & (per_request <= 40)) > 0.8
    history = np.diff(log.timeline_offsets)
    assert np.mean(history >= 200) > 0.3
