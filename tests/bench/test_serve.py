"""``sterling bench serve`` per tower: the tower names, and a tiny ``--quick --tower hstu`` run end to
end (servers, ladder, swap, sustained updates in memory and with the log, a restart on the log,
per-stage times, per-candidate cost) that produces rows."""

import json
from dataclasses import replace

import pytest

from sterling.bench import serve
from sterling.bench.serve import ServeBenchConfig, Step, format_table, parse_towers


def test_towers_parse_with_the_ranker_on_sequence_towers_only():
    assert parse_towers("two_tower") == ("two_tower",)
    assert parse_towers("two_tower, hstu,hstu+ranker,hstu") == ("two_tower", "hstu", "hstu+ranker")
    assert parse_towers("two_tower,sasrec", ranker=True) == ("two_tower", "sasrec+ranker")
    assert parse_towers("all") == serve.ALL_TOWERS
    for bad in ("bert", "two_tower+ranker", "hstu+mol", ""):
        with pytest.raises(ValueError, match="unknown tower"):
            parse_towers(bad)


def test_a_step_averages_the_answers_stage_times():
    timings = [{"queue": 1.0, "user_tower": 2.0, "ranker": 4.0, "batch_size": 2}, {"queue": 3.0, "user_tower": 4.0}]
    step = Step.of("batched", 10, [0.01, 0.02], 0, 1.0, timings, "hstu+ranker")
    assert step.tower == "hstu+ranker" and step.batch_size == 1.5
    assert step.stages_ms == {"queue": 2.0, "user_tower": 3.0, "ranker": 2.0}
    assert Step(**json.loads(json.dumps(step.__dict__))) == step


def test_quick_runs_with_the_hstu_tower_and_its_ranker(tmp_path, monkeypatch, capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("aiohttp")
    from sterling.cli import main

    tiny = replace(
        ServeBenchConfig.quick(),
        rates=(20,),
        step_seconds=1.0,
        swap_seconds=1.5,
        reloads=1,
        sustained_seconds=1.0,
        sustained_writers=2,
        mix_size=50,
        recall_requests=10,
        cost_batches=(2,),
        cost_seconds=0.05,
        cost_items=600,
        cost_candidates=20,
    )
    monkeypatch.setattr(ServeBenchConfig, "quick", classmethod(lambda cls: tiny))
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--quick", "--items", "1500", "--towers", "hstu,hstu+ranker", "--json", str(out)]
    assert main([*argv, "--snapshots", str(tmp_path / "snaps")]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["towers"] == ["hstu", "hstu+ranker"] and result["towers"] == ["hstu", "hstu+ranker"]
    for name, scorer, stage in (("hstu", "cosine", "overarch"), ("hstu+ranker", "ranker", "ranker")):
        rows = [r for r in result["rows"] if r["tower"] == name]
        assert {r["mode"] for r in rows} == {
            "batched",
            "unbatched",
            "swap_and_update",
            "swap_and_update_log",
            "updates_sustained",
            "updates_sustained_log",
        }
        assert all(r["errors"] == 0 and r["achieved_qps"] > 0 for r in rows)
        v = result["variants"][name]
        assert v["snapshot"]["scorer"] == scorer and v["snapshot"]["num_items"] == 1500
        assert {"user_tower", "ann", stage, "value_model"} <= set(v["stages_ms"]["unbatched"])
        assert v["updates_visible"] == v["updates_acknowledged"] > 0
        durable = v["durable"]  # the same run with --log: nothing lost, and the append's cost
        assert durable["updates_visible"] == durable["updates_acknowledged"] > 0 and durable["log_append_ms"] > 0
        d = v["durability"]  # updates as fast as acknowledged, in memory and with the log: none lost
        for m in ("memory", "log"):
            assert d["updates_per_s"][m] > 0 and d["updates_visible"][m] == d["updates_acknowledged"][m] > 0
            assert d["lost"][m] == 0 and d["update_failures"][m] == 0 and d["p99_ms"][m] > 0
        restart = d["after_restart"]  # after a SIGKILL, the log gives back both steps' updates
        assert restart["lost"] == 0
        assert restart["updates_acknowledged"] == durable["updates_acknowledged"] + d["updates_acknowledged"]["log"]
    assert result["variants"]["hstu+ranker"]["snapshot"]["tasks"] == ["click", "like", "share"]
    cost = {r["scorer"]: r for r in result["candidate_cost"]["rows"]}
    assert set(cost) == {"mol_overarch", "hstu_ranker", "sasrec_ranker"}
    assert all(r["us_per_candidate"] > 0 and r["batch"] == 2 and r["candidates"] == 20 for r in cost.values())
    table = format_table(result)
    assert "hstu+ranker" in table and "us/candidate" in table and "max QPS at P99 <= 50 ms, batched:" in table
    assert "with --log (durable)" in table and "updates/s sustained" in table and "after a SIGKILL" in table
