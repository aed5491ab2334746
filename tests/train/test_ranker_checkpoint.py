"""Ranker checkpoints (``sterling train --ranker --out DIR``): the snapshot round trip gives the
trained model's logits exactly, a snapshot of another kind is refused, ``train_ranker`` writes one
that reproduces its held-out metrics, and the command line writes a loadable one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sterling.cli import main
from sterling.data.batch import ItemCatalog, RequestReader
from sterling.data.items import read_items
from sterling.data.synth import SynthConfig, generate
from sterling.models.ranker import RankerConfig, SequenceRanker
from sterling.train.ranker_checkpoint import KIND, RankerCheckpoint, load_ranker_checkpoint, write_ranker_checkpoint
from sterling.train.ranking import RankingConfig, accumulate_gradient, evaluate_ranker, train_ranker
from sterling.train.sequence_checkpoint import load_sequence_checkpoint, write_sequence_checkpoint
from sterling.train.sequence_model import RetrievalConfig, SequenceRetriever
from sterling.train.split import holdout_requests

TASKS = ("click", "like", "share")
SMALL = ["--dim", "8", "--layers", "1", "--max-len", "16", "--token-budget", "256"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cfg = SynthConfig(
        num_users=30,
        num_items=200,
        requests_per_user=(2, 3),
        impressions_per_request=(3, 10),
        history_length=(5, 20),
        seed=5,
    )
    return generate(cfg, tmp_path_factory.mktemp("rankckpt") / "synth")


def _reader(data, max_history: int = 16, token_budget: int = 256) -> RequestReader:
    item_ids, _, _ = read_items(data / "items.parquet")
    return RequestReader(data, ItemCatalog(item_ids), max_history, token_budget)


def _trained(encoder: str, reader: RequestReader) -> SequenceRanker:
    """A ranker after three Adam steps on real batches (dropout on: eval mode must switch it off)."""
    torch.manual_seed(0)
    cfg = RankerConfig(
        num_items=len(reader.catalog), tasks=TASKS, encoder=encoder, dim=8, num_layers=2, num_heads=2, dropout=0.3
    )
    model = SequenceRanker(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _, batch in zip(range(3), reader.batches(), strict=False):
        opt.zero_grad()
        accumulate_gradient(model, batch, "roo", 10_000)
        opt.step()
    return model


@pytest.mark.parametrize("encoder", ["hstu", "sasrec"])
def test_round_trip_gives_the_trained_models_logits_exactly(tmp_path, data, encoder):
    reader = _reader(data)
    model = _trained(encoder, reader)
    item_ids = np.asarray(reader.catalog.item_ids, dtype=np.int64)
    path = write_ranker_checkpoint(tmp_path / "ckpt", model, item_ids, {"steps": 3, "note": "x"})
    ckpt = load_ranker_checkpoint(path)
    assert isinstance(ckpt, RankerCheckpoint) and not ckpt.model.training
    assert ckpt.item_ids.dtype == np.int64 and np.array_equal(ckpt.item_ids, item_ids)
    assert ckpt.model.cfg == model.cfg and ckpt.model.cfg.tasks == TASKS
    assert ckpt.meta["kind"] == KIND and ckpt.meta["ranker"] == json.loads(json.dumps(model.cfg.to_json()))
    assert ckpt.meta["steps"] == 3 and ckpt.meta["note"] == "x"
    model.eval()
    with torch.no_grad():
        for batch in list(reader.batches())[:2]:
            for mode in ("roo", "impression"):
                assert torch.equal(ckpt.model(batch, mode), model(batch, mode)), mode
    for name, tensor in model.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[name], tensor), name


def test_wrong_kind_and_bad_inputs_are_errors(tmp_path):
    retriever = SequenceRetriever(12, RetrievalConfig(dim=8, num_layers=1, max_len=10))
    seq = write_sequence_checkpoint(tmp_path / "seq", retriever, np.arange(12), {})
    with pytest.raises(ValueError, match="'sequence_checkpoint'.*'ranker_checkpoint'"):
        load_ranker_checkpoint(seq)
    ranker = SequenceRanker(RankerConfig(num_items=12, tasks=("click",), dim=8, num_layers=1))
    path = write_ranker_checkpoint(tmp_path / "rank", ranker, np.arange(12) + 100, {})
    with pytest.raises(ValueError, match="'ranker_checkpoint'.*'sequence_checkpoint'"):
        load_sequence_checkpoint(path)
    with pytest.raises(ValueError, match=r"item_ids must be \[12\]"):
        write_ranker_checkpoint(tmp_path / "bad", ranker, np.arange(11), {})
    with pytest.raises(ValueError, match="may not set"):
        write_ranker_checkpoint(tmp_path / "bad", ranker, np.arange(12), {"ranker": {}})
    with pytest.raises(ValueError):  # a SnapshotError: not a snapshot
        load_ranker_checkpoint(tmp_path / "missing")


def test_train_ranker_writes_a_checkpoint_that_reproduces_its_metrics(tmp_path, data):
    cfg = RankingConfig(dim=8, num_layers=1, max_history=16, token_budget=256, max_steps=3, dropout=0.2)
    report = train_ranker(data, cfg, log=lambda s: None, out_dir=tmp_path / "ranker")
    assert report.steps == 3 and report.checkpoint == str(tmp_path / "ranker")
    ckpt = load_ranker_checkpoint(report.checkpoint)
    meta = ckpt.meta
    assert meta["data_dir"] == str(data.resolve()) and meta["steps"] == 3
    assert meta["ranking"] == json.loads(json.dumps(report.config)) and meta["ranking"]["max_steps"] == 3
    assert meta["ranker"]["tasks"] == list(TASKS) and meta["ranker"]["num_items"] == 200
    reader = _reader(data)
    assert np.array_equal(ckpt.item_ids, reader.catalog.item_ids)
    again = evaluate_ranker(ckpt.model, reader, holdout_requests(data / "requests.parquet"))
    for metric in ("auc", "ne", "gauc"):
        reported = getattr(report, metric)
        assert set(reported) == set(TASKS) == set(meta["metrics"][metric])
        for task, value in reported.items():
            stored = meta["metrics"][metric][task]
            assert (math.isnan(value) and stored is None) or stored == value, (metric, task)
            assert (math.isnan(value) and math.isnan(again[metric][task])) or again[metric][task] == value
    assert train_ranker(data, cfg, log=lambda s: None).checkpoint is None


def test_cli_writes_a_loadable_checkpoint(tmp_path, data, capsys):
    out = tmp_path / "ranker"
    argv = ["train", "--ranker", "--data", str(data), "--out", str(out), "--max-steps", "2", *SMALL]
    assert main([*argv, "--encoder", "sasrec", "--json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert f"checkpoint: {out}" in printed and "AUC" in printed and "GAUC" in printed
    assert all(task in printed for task in TASKS)
    ckpt = load_ranker_checkpoint(out)
    assert ckpt.model.cfg.encoder == "sasrec" and ckpt.model.cfg.dim == 8 and ckpt.meta["steps"] == 2
    assert ckpt.meta["ranking"]["mode"] == "roo" and ckpt.meta["ranking"]["max_history"] == 16
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["checkpoint"] == str(out) and set(result["auc"]) == set(TASKS)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ranker", "--model", "hstu"], "--ranker trains the request-level ranker; --model hstu"),
        (["--ranker", "--patience", "2"], "--patience: only with --model hstu or sasrec"),
        (["--ranker", "--nproc", "2"], "--nproc"),
        (["--encoder", "sasrec", "--out", "x"], "--encoder: only with --ranker"),
        (["--heads", "2", "--out", "x"], "--heads: only with --model hstu or sasrec, or --ranker"),
        (["--layers", "2", "--out", "x"], "--layers: only with --model hstu or sasrec, or --ranker"),
    ],
)
def test_cli_rejects_options_of_other_models(tmp_path, extra, message, capsys):
    assert main(["train", "--data", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err
