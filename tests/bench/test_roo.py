"""``sterling bench roo`` on a tiny configuration: the rows carry the documented keys, the two
same-model arms see the same impressions and agree on NE, and the summary is computed from them."""

import math

from sterling.bench.roo import ARMS, RooBenchConfig, format_table, run

TINY = RooBenchConfig(
    users=24,
    items=200,
    requests_per_user=(2, 3),
    impressions_per_request=(5, 10),
    median_impressions=7,
    history_length=(20, 40),
    max_history=32,
    impressions=150,
    token_budget=256,
    dim=16,
    layers=1,
    scaled_dim=16,
    scaled_layers=2,
)


def test_rows_summary_and_table():
    result = run(TINY, log=lambda s: None)
    rows = result["rows"]
    keys = {
        "arm",
        "dataset",
        "impressions_per_request",
        "history_len",
        "impressions_per_s",
        "peak_rss_mb",
        "bytes_per_impression",
        "auc",
        "ne",
    }
    assert [r["arm"] for r in rows] == list(ARMS) and all(keys <= set(r) for r in rows)
    assert {"platform", "cpus", "torch"} <= set(result["machine"])
    imp, roo, _ = rows
    assert imp["impressions"] == roo["impressions"] >= 150
    assert set(imp["ne"]) == {"click", "like", "share"} and all(r["peak_rss_mb"] > 0 for r in rows)
    for task in imp["ne"]:
        if not math.isnan(imp["ne"][task]):
            assert abs(imp["ne"][task] - roo["ne"][task]) < 0.05 * imp["ne"][task]
    summary = result["summary"]["synthetic"]
    assert summary["speedup"] == roo["impressions_per_s"] / imp["impressions_per_s"]
    assert summary["storage_ratio"] == imp["bytes_per_impression"] / roo["bytes_per_impression"] > 1
    per = result["storage"]["synthetic"]["bytes_per_impression"]
    assert (
        imp["bytes_per_impression"] == per["impressions_time_order"]
        and roo["bytes_per_impression"] == per["requests_format"]
    )
    assert summary["storage_ratio_user_order"] == per["impressions_user_order"] / per["requests_format"]
    assert "ROO" in format_table(result)
