"""``sterling bench quality``: rows per encoder with mean ± s.e. over seeds, the paired comparison,
finished runs read back from the work folder, the CLI."""

import json
import math

import numpy as np
import pytest
import torch

from sterling.bench.quality import PUBLISHED, QualityBenchConfig, _paired, _user_metrics, format_table, run
from sterling.bench.report import comma_list
from sterling.cli import main
from sterling.train.retrieval import UNSEEN, ranking_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_user_metrics_average_to_the_ranking_metrics():
    ranks = torch.tensor([0, 3, 9, 10, 57, 2])
    per_user = _user_metrics(ranks, 10)
    expected = ranking_metrics(ranks, (10,))
    assert per_user["hr@10"].mean() == pytest.approx(expected["hr@10"])
    assert per_user["ndcg@10"].mean() == pytest.approx(expected["ndcg@10"])


def test_paired_difference_and_its_standard_error():
    a = [np.array([1.0, 0.0, 1.0, 1.0]), np.array([1.0, 1.0, 1.0, 0.0])]
    b = [np.array([0.0, 0.0, 1.0, 0.0]), np.array([0.0, 1.0, 0.0, 0.0])]
    d = np.array([1.0, 0.0, 0.5, 0.5])  # per user: mean over seeds of a minus b
    mean, se = _paired(a, b)
    assert mean == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / 2)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    work = tmp_path_factory.mktemp("quality")
    lines = []
    return run(QualityBenchConfig.quick(), None, work, log=lines.append), work, lines


def test_quick_run_rows_comparisons_and_table(quick):
    result, _, _ = quick
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"hstu", "sasrec", "most_popular"}
    for model in ("hstu", "sasrec"):
        row = rows[model]
        assert [s["seed"] for s in row["per_seed"]] == [0, 1]
        for key in ("hr@10", "ndcg@20", UNSEEN + "hr@10"):
            values = [s["test"][key] for s in row["per_seed"]]
            assert row[key] == pytest.approx(np.mean(values))
            assert row[f"{key}_se"] == pytest.approx(np.std(values, ddof=1) / math.sqrt(2))
    metrics = [c["metric"] for c in result["comparisons"]]
    assert metrics == ["hr@10", "ndcg@10", UNSEEN + "hr@10", UNSEEN + "ndcg@10"]
    for c in result["comparisons"]:
        assert c["diff"] == pytest.approx(rows["hstu"][c["metric"]] - rows["sasrec"][c["metric"]])
        # the paired mean over users is the same difference of means
        assert c["paired_diff"] == pytest.approx(c["diff"])
    table = format_table(result)
    assert "seen items excluded" in table and "HSTU − SASRec" in table
    assert f"{PUBLISHED[0]['rows']['hstu']['hr@10']:.4f}" in table
    json.dumps(result)  # strict JSON


def test_finished_runs_are_read_back_not_trained_again(quick):
    result, work, _ = quick
    lines = []
    again = run(QualityBenchConfig.quick(), None, work, log=lines.append)
    assert sum("read back" in line for line in lines) == 4
    assert again["rows"] == result["rows"] and again["comparisons"] == result["comparisons"]


def test_cli_quick(tmp_path, capsys):
    out = tmp_path / "q.json"
    assert main(["bench", "quality", "--quick", "--seeds", "0", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "full corpus, history not excluded" in printed
    result = json.loads(out.read_text())
    assert result["config"]["seeds"] == [0] and result["comparisons"][0]["se_seeds"] is None
    # the default is GR's protocol: the last epoch of a fixed budget, nothing selected by validation
    assert result["config"]["sequence"]["holdout"] == 1 and result["rows"][0]["best_epochs"] == [None]
    argv = ["bench", "quality", "--quick", "--seeds", "0", "--encoders", "sasrec", "--holdout", "2"]
    argv += ["--patience", "1", "--lr", "3e-3", "--lr-decay", "constant", "--layers", "2", "--json", str(out)]
    assert main([*argv, "--heads", "2", "--train-events", "all"]) == 0
    result = json.loads(out.read_text())
    sequence = result["config"]["sequence"]
    assert (sequence["holdout"], sequence["patience"], sequence["lr"], sequence["lr_decay"]) == (2, 1, 3e-3, "constant")
    assert sequence["num_layers"] == 2 and QualityBenchConfig.quick().sequence.num_layers == 1
    assert (sequence["num_heads"], sequence["train_events"]) == (2, "all")
    assert [r["model"] for r in result["rows"]] == ["sasrec", "most_popular"] and result["comparisons"] == []
    assert result["rows"][0]["best_epochs"][0] in (1, 2)


def test_comma_list_options_convert_and_name_the_option():
    assert comma_list(" 0, 1,", "--seeds", int) == (0, 1)
    assert comma_list("hstu,sasrec", "--encoders") == ("hstu", "sasrec")
    for bad in ("0,x", " , "):
        with pytest.raises(ValueError, match="--seeds"):
            comma_list(bad, "--seeds", int)
