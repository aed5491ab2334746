"""``sterling bench retrieval`` on a tiny configuration: four rows with the documented keys, recalls
that are fractions and agree with an independent count, and the cached ranking equal to recomputing."""

from dataclasses import replace

from sterling.bench.retrieval import KS, ROWS, RetrievalBenchConfig, default_formula, format_table, run
from sterling.data.synth import SynthConfig
from sterling.train.loop import TrainConfig
from sterling.train.overarch import OverArchTrainConfig

TINY = RetrievalBenchConfig(
    synth=replace(SynthConfig(), num_users=50, num_items=300, requests_per_user=(2, 4), seed=4),
    train=TrainConfig(epochs=1, dim=16, hidden=32, overarch=OverArchTrainConfig(epochs=1, hidden=32)),
    k0=500,
    batch=16,
    rank_candidates=20,
)


def test_rows_ranking_and_table():
    result = run(TINY, log=lambda s: None)
    rows = result["rows"]
    assert [r["row"] for r in rows] == list(ROWS) and {r["dataset"] for r in rows} == {"synthetic"}
    for r in rows:
        assert {"row", "dataset", "qps", *(f"recall@{k}" for k in KS)} <= set(r)
        assert r["qps"] > 0 and all(0.0 <= r[f"recall@{k}"] <= 1.0 for k in KS)
        assert [r[f"recall@{k}"] for k in KS] == sorted(r[f"recall@{k}"] for k in KS)  # recall grows with K
    # with 300 items every row ranks the whole catalogue by K = 500: all engaged items are found
    assert all(r["recall@500"] == 1.0 for r in rows)
    assert rows[-1]["value_formula"] == default_formula(("click", "like", "share")) == "click + 0.5*like + 0.25*share"
    (ranking,) = result["ranking"]
    assert ranking["identical"] and ranking["max_abs_diff"] == 0.0 and ranking["cached_qps"] > 0
    assert {"platform", "cpus", "torch"} <= set(result["machine"])
    table = format_table(result)
    assert all(row in table for row in ROWS) and "identical" in table
