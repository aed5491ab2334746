"""Dataset statistics of both formats (sterling.data.stats)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from sterling.data.group import requests_to_impressions
from sterling.data.stats import dataset_stats, format_stats
from sterling.data.synth import SynthConfig, generate


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    config = SynthConfig(num_users=60, num_items=400, requests_per_user=(1, 10), history_length=(20, 120), seed=2)
    return generate(config, tmp_path_factory.mktemp("synth"))


def test_request_format_is_smaller(synth):
    stats = dataset_stats(synth)
    per = stats["bytes_per_impression"]
    assert stats["format"] == "requests"
    assert per["requests_format"] < per["impressions_user_order"] < per["impressions_time_order"]
    for order in ("time", "user"):
        name = f"impressions_{order}_order"
        assert stats["ratio"][order] == pytest.approx(stats["bytes"][name] / stats["bytes"]["requests_format"])
        assert per[name] == pytest.approx(stats["bytes"][name] / stats["impressions"])
    assert per["requests_format"] == pytest.approx(stats["bytes"]["requests_format"] / stats["impressions"])
    assert stats["bytes"]["items"] == (synth / "items.parquet").stat().st_size


def test_numbers_match_the_files(synth, tmp_path):
    stats = dataset_stats(synth)
    requests = pq.read_table(synth / "requests.parquet")
    counts = np.array([len(x) for x in requests.column("impressions").to_pylist()])
    assert stats["requests"] == requests.num_rows and stats["impressions"] == counts.sum()
    assert stats["users"] == len(set(requests.column("user_id").to_pylist()))
    ipr = stats["impressions_per_request"]
    assert ipr["mean"] == pytest.approx(counts.mean()) and ipr["max"] == counts.max()
    assert ipr["p50"] == pytest.approx(np.percentile(counts, 50))

    impressions = requests_to_impressions(synth, tmp_path / "imp")
    table = pq.read_table(impressions / "impressions.parquet", columns=["request_id", "history_ts"])
    first = np.unique(table.column("request_id").to_numpy(), return_index=True)[1]
    history = np.array([len(table.column("history_ts")[int(i)].as_py()) for i in first])
    assert stats["history_length"]["mean"] == pytest.approx(history.mean())
    assert stats["history_length"]["max"] == history.max()

    other = dataset_stats(impressions)
    assert other["format"] == "impressions"
    for key in ("requests", "impressions", "users", "impressions_per_request", "history_length"):
        assert other[key] == stats[key]
    for order in ("time", "user"):  # both written from the same request rows
        assert other["bytes"][f"impressions_{order}_order"] == stats["bytes"][f"impressions_{order}_order"]
    assert other["bytes"]["impressions_user_order"] == (impressions / "impressions.parquet").stat().st_size


def test_stats_are_plain_json(synth):
    stats = dataset_stats(synth)
    assert json.loads(json.dumps(stats)) == stats


def test_format_stats_is_a_table(synth):
    text = format_stats(dataset_stats(synth))
    assert "B/impression" in text and f"{dataset_stats(synth)['ratio']['time']:.2f}x the request format" in text
    assert "impression format, time order" in text and "impression format, user order" in text
    assert len(text.splitlines()) == 10
