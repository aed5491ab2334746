"""End to end: synthetic data → train → publish → query, through the API and the CLI."""

import json

import pyarrow.parquet as pq
import pytest

from sterling.cli import main
from sterling.data.items import read_items
from sterling.data.synth import SynthConfig, generate
from sterling.retrieval.publish import load_model, publish
from sterling.snapshot import SnapshotError
from sterling.train.checkpoint import load_checkpoint
from sterling.train.loop import TrainConfig, train


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    data = generate(SynthConfig(num_users=60, num_items=400, seed=5), root / "data")
    report = train(data, root / "ckpt", TrainConfig(epochs=1, max_steps=4, dim=16, hidden=32), log=lambda s: None)
    snap = publish(report.checkpoint, data / "items.parquet", root / "snap")
    return root, data, report, snap


def test_train_reports_held_out_metrics(flow):
    _, _, report, _ = flow
    assert report.steps == 4
    assert {"recall@10", "recall@50", "recall@10_popular"} <= set(report.metrics)
    assert all(0.0 <= v <= 1.0 for k, v in report.metrics.items() if k.startswith("recall"))
    ckpt = load_checkpoint(report.checkpoint)
    assert ckpt.model.cfg.dim == 16


def test_published_model_honours_filters(flow):
    _, data, _, snap = flow
    rec = load_model(snap)
    plain = load_model(snap, use_overarch=False)  # ranks the index's candidates by inner product
    ids, attributes, _ = read_items(data / "items.parquet")
    by_id = dict(zip(ids.tolist(), attributes))
    history = ids[:7].tolist()
    _, queries = plain.encode(plain.inputs([history]))
    for flt in ["language:en", "year >= 2000 AND NOT region:na", "category:no-such-value"]:
        res = rec.recommend(history, filter=flt, k=20)
        got = [i for i in res.ids[0].tolist() if i >= 0]
        assert all(rec.index.attributes_of([i])[0] == by_id[i] for i in got)
        passing = [
            i
            for i in plain.index.search(queries[:, plain.config.primary], k=len(ids), filter=flt).ids[0].tolist()
            if i >= 0
        ]
        assert set(got) <= set(passing) and len(got) == min(20, len(passing))  # OverArch reorders them
        want = passing[:20]
        assert [i for i in plain.recommend(history, filter=flt, k=20).ids[0].tolist() if i >= 0] == want
    assert (rec.recommend(history, filter="category:no-such-value", k=5).ids == -1).all()
    res = rec.recommend(history, k=3)
    assert res.scores[0, 0] >= res.scores[0, 1] >= res.scores[0, 2]


def test_cli_query(flow, capsys):
    _, data, _, snap = flow
    user = pq.read_table(data / "users.parquet", columns=["user_id"]).column("user_id")[0].as_py()
    assert main(["query", "--snapshot", str(snap), "--user", str(user), "--filter", "language:en", "-k", "4"]) == 0
    out = capsys.readouterr().out
    assert f"user {user}" in out and "language=en" in out
    assert main(["query", "--snapshot", str(snap), "--user", str(user), "-k", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 3


def test_cli_bad_filter_names_the_position(flow, capsys):
    _, data, _, snap = flow
    history = ",".join(map(str, read_items(data / "items.parquet")[0][:2]))
    code = main(["query", "--snapshot", str(snap), "--history", history, "--filter", "language:en AND (year > 2000"])
    assert code == 2
    err = capsys.readouterr().err
    assert "position" in err and "Traceback" not in err


def test_tampered_snapshot_is_refused(flow, tmp_path, capsys):
    import shutil

    _, _, _, snap = flow
    bad = tmp_path / "snap"
    shutil.copytree(snap, bad)
    target = bad / "model.safetensors"
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError, match="model.safetensors"):
        load_model(bad)
    assert main(["query", "--snapshot", str(bad), "--user", "1"]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_publish_refuses_a_different_catalogue(flow, tmp_path):
    _, _, report, _ = flow
    other = generate(SynthConfig(num_users=10, num_items=50, seed=9), tmp_path / "other")
    with pytest.raises(ValueError, match="differ"):
        publish(report.checkpoint, other / "items.parquet", tmp_path / "snap")
