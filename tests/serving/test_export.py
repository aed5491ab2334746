"""Publish → snapshot → load equals the model composed in memory; the exported program equals both."""

from dataclasses import replace

import pytest
import torch

from sterling.data.synth import SynthConfig, generate
from sterling.models.value_model import FormulaError
from sterling.serving import publish as publishing
from sterling.serving.snapshot import SnapshotError, read_snapshot
from sterling.train.loop import TrainConfig, train
from sterling.train.overarch import OverArchTrainConfig

if not hasattr(torch, "export"):
    pytest.skip("torch.export unavailable in this torch build", allow_module_level=True)

from sterling.serving.export import load_program, run_program  # noqa: E402

FORMULA = "click + 0.5*like^0.5 + 0.25*share"
CASES = [  # (history picks, filters): batch sizes 1 and 3, different history lengths, per-request filters
    ([[0, 3, 5, 7]], None),
    ([[]], "language:en"),
    ([[1], [2, 4, 6, 8, 10, 12, 14], []], ["language:en", None, "year >= 2010 AND NOT region:na"]),
    ([[9, 11], [13], [15, 16, 17]], "category:sports OR tags IN (music-live, gaming-live)"),
]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = generate(replace(SynthConfig(), num_users=80, num_items=500, seed=6), root / "data")
    ckpt = train(data, root / "ckpt", TrainConfig(epochs=1, max_steps=6, dim=16, hidden=32,
                                                  overarch=OverArchTrainConfig(epochs=1, max_steps=4)),
                 log=lambda s: None).checkpoint
    snap = publishing.publish(ckpt, data / "items.parquet", root / "snap", k0=60, value_formula=FORMULA, export=True)
    return root, data, ckpt, snap


def _compose_in_memory(snap):
    """The model composed from the snapshot's parts without the loader (the eager reference)."""
    s = read_snapshot(snap)
    index = publishing.ItemIndex.from_snapshot_parts(s.meta["index"], s.tensors["index"])
    return publishing._compose(s.meta, s.tensors["model"], index, s.tensors["cache"]["state"])


def test_loaded_snapshot_and_exported_program_equal_the_eager_model(published):
    _, _, _, snap = published
    loaded = publishing.load_model(snap)
    eager = _compose_in_memory(snap)
    program = load_program((snap / "program.pt2").read_bytes())
    ids = loaded.ids.tolist()
    for picks, filters in CASES:
        histories = [[ids[i] for i in row] for row in picks]
        inputs = loaded.inputs(histories)
        want = eager(inputs, filter=filters, k=20)
        got = loaded(inputs, filter=filters, k=20)
        assert torch.equal(got.ids, want.ids) and torch.equal(got.scores, want.scores)
        plan = loaded.plan(len(histories), filters)
        p_ids, p_scores, p_tasks = run_program(program, inputs, plan.probes, plan.allowed, 20)
        assert torch.equal(p_ids, want.ids)
        torch.testing.assert_close(p_scores, want.scores, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p_tasks, want.task_scores, rtol=1e-5, atol=1e-5)
        assert (want.ids >= 0).any() and len(histories) == want.ids.shape[0]


def test_the_published_value_model_and_its_overrides(published):
    _, _, _, snap = published
    model = publishing.load_model(snap)
    assert model.value_model is not None and model.value_model.formula == FORMULA and model.overarch is not None
    plain = publishing.load_model(snap, use_overarch=False, value_formula=None)
    assert plain.overarch is None and plain.value_model is None


def test_a_tampered_program_is_refused(published, tmp_path):
    import shutil

    _, _, _, snap = published
    bad = tmp_path / "snap"
    shutil.copytree(snap, bad)
    raw = bytearray((bad / "program.pt2").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (bad / "program.pt2").write_bytes(bytes(raw))
    with pytest.raises(SnapshotError, match="checksum mismatch for program.pt2"):
        publishing.load_model(bad)


def test_a_bad_formula_fails_at_publish_before_anything_is_written(published, tmp_path):
    _, data, ckpt, _ = published
    with pytest.raises(FormulaError, match="unknown task 'clik'"):
        publishing.publish(ckpt, data / "items.parquet", tmp_path / "snap", value_formula="0.7*clik + like")
    assert not (tmp_path / "snap").exists()


def test_load_model_overrides_are_checked(published):
    _, _, _, snap = published
    with pytest.raises(ValueError, match="cannot override \\['kk0'\\]"):
        publishing.load_model(snap, kk0=5)
    assert publishing.load_model(snap, k0=7, nprobe=1).config.k0 == 7
