"""The AOTInductor package of the published forward answers like the eager model."""

import shutil
from dataclasses import replace

import pytest
import torch

from sterling.data.synth import SynthConfig, generate
from sterling.retrieval.export import load_package, run_program
from sterling.retrieval.publish import load_model, publish
from sterling.train.loop import TrainConfig, train
from sterling.train.overarch import OverArchTrainConfig


@pytest.mark.skipif(shutil.which("g++") is None, reason="AOTInductor needs a C++ compiler (g++ not on PATH)")
def test_aot_package_equals_eager(tmp_path):
    data = generate(replace(SynthConfig(), num_users=60, num_items=300, seed=3), tmp_path / "data")
    ckpt = train(
        data,
        tmp_path / "ckpt",
        TrainConfig(epochs=1, max_steps=3, dim=16, hidden=32, overarch=OverArchTrainConfig(epochs=1, max_steps=3)),
        log=lambda s: None,
    ).checkpoint
    snap = publish(ckpt, data / "items.parquet", tmp_path / "snap", k0=40, value_formula="click + 0.5*like", aot=True)
    assert (snap / "program.pt2").is_file() and (snap / "program.aoti.pt2").is_file()
    model = load_model(snap)
    compiled = load_package(snap / "program.aoti.pt2")
    ids = model.index.ids
    for histories, filters in (
        ([[int(ids[0]), int(ids[4])], [int(ids[2])], []], ["language:en", None, "year >= 2010"]),
        ([[int(ids[9])]], None),
    ):
        inputs = model.inputs(histories)
        want = model(inputs, filter=filters, k=10)
        plan = model.plan(len(histories), filters)
        got_ids, got_scores, got_tasks = run_program(compiled, inputs, plan.probes, plan.allowed, 10)
        assert torch.equal(got_ids, want.ids)
        torch.testing.assert_close(got_scores, want.scores, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_tasks, want.task_scores, rtol=1e-5, atol=1e-5)
