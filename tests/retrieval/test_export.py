"""Publish → snapshot → load equals the model composed in memory; the exported program equals both."""

from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sterling.data.batch import encode_categorical
from sterling.data.synth import SynthConfig, generate
from sterling.models.value_model import FormulaError
from sterling.retrieval import publish as publishing
from sterling.snapshot import SnapshotError, read_snapshot
from sterling.train.loop import TrainConfig, train
from sterling.train.overarch import OverArchTrainConfig

try:
    import torch.export  # noqa: F401
except ImportError as e:  # pragma: no cover - a torch build without torch.export
    pytest.skip(f"torch.export unavailable: {e}", allow_module_level=True)

from sterling.retrieval.export import load_program, run_program  # noqa: E402

FORMULA = "click + 0.5*like^0.5 + 0.25*share"
INDEX = publishing.IndexConfig(
    nlist=8, min_candidates=1.0
)  # the index order is not the catalogue order; 2 of 8 lists probed
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
    ckpt = train(
        data,
        root / "ckpt",
        TrainConfig(epochs=1, max_steps=6, dim=16, hidden=32, overarch=OverArchTrainConfig(epochs=1, max_steps=4)),
        log=lambda s: None,
    ).checkpoint
    snap = publishing.publish(
        ckpt,
        data / "items.parquet",
        root / "snap",
        index_config=INDEX,
        k0=60,
        nprobe=2,
        value_formula=FORMULA,
        export=True,
    )
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
    ids = loaded.index.ids.tolist()
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
    assert (
        model.values.configured is not None
        and model.values.configured.formula == FORMULA
        and model.overarch is not None
    )
    plain = publishing.load_model(snap, use_overarch=False, value_formula=None)
    assert plain.overarch is None and plain.values.configured is None


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


def user_requests(data, model, users: int, offset: int = 0):
    """The latest timeline events, actions and encoded user features of dataset users, as the
    model's inputs (context features left at 0)."""
    table = pq.read_table(data / "users.parquet").slice(offset, users)
    histories = [h[-model.config.max_history :] for h in table.column("timeline_item_id").to_pylist()]
    actions = [a[-model.config.max_history :] for a in table.column("timeline_action").to_pylist()]
    names = [n for n in ("age_bucket", "country") if n in model.config.features]
    codes = {n: encode_categorical(table.column(n)) for n in names}
    features = [{n: int(codes[n][i]) for n in names} for i in range(table.num_rows)]
    return model.inputs(histories, actions, features)


@pytest.mark.parametrize(
    "users, offset, filters",
    [
        (1, 0, "language:en"),
        (3, 5, ["language:en", None, "category:sports OR year < 2005"]),
        (5, 10, None),
        (2, 20, ["category:no-such-value", "NOT language:en"]),
    ],
)
def test_dataset_users_through_the_program_and_the_loaded_model(published, users, offset, filters):
    """Real users (histories of different lengths, actions, user features): the loaded snapshot,
    the eager model composed in memory and the exported program answer alike, for k < k0 and
    k = k0, batches of 1 to 5 (the program's batch dimension is dynamic)."""
    _, data, _, snap = published
    loaded = publishing.load_model(snap)
    eager = _compose_in_memory(snap)
    program = load_program((snap / "program.pt2").read_bytes())
    inputs = user_requests(data, loaded, users, offset)
    assert inputs.batch_size == users and inputs.features.shape == (users, len(loaded.config.features))
    assert (inputs.features != 0).any()
    plan = loaded.plan(users, filters)
    for k in (7, loaded.config.k0):
        want = eager(inputs, filter=filters, k=k)
        got = loaded(inputs, filter=filters, k=k)
        assert torch.equal(got.ids, want.ids) and torch.equal(got.scores, want.scores)
        assert torch.equal(got.task_scores, want.task_scores)
        p_ids, p_scores, p_tasks = run_program(program, inputs, plan.probes, plan.allowed, k)
        assert p_ids.shape == (users, k) and p_tasks.shape == (users, k, len(loaded.config.tasks))
        assert torch.equal(p_ids, want.ids)
        torch.testing.assert_close(p_scores, want.scores, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p_tasks, want.task_scores, rtol=1e-5, atol=1e-5)
    if filters is None:
        assert (want.ids >= 0).all()  # 500 items pass: every slot is filled


def test_the_snapshot_holds_the_program_only_when_exported(published, tmp_path):
    _, data, ckpt, snap = published
    manifest = read_snapshot(snap).manifest
    assert "program.pt2" in manifest["files"]
    plain = publishing.publish(ckpt, data / "items.parquet", tmp_path / "plain", index_config=INDEX, k0=60, nprobe=2)
    assert not (plain / "program.pt2").exists()
    assert "program.pt2" not in read_snapshot(plain).manifest["files"]
    a, b = publishing.load_model(plain), publishing.load_model(snap)
    inputs = a.inputs([a.index.ids[:6].tolist()])
    # published without a formula and given it at load == published with it
    x = publishing.load_model(plain, value_formula=FORMULA)(inputs, filter="language:en", k=10)
    y = b(inputs, filter="language:en", k=10)
    assert torch.equal(x.ids, y.ids) and torch.equal(x.scores, y.scores)
    assert np.array_equal(a.index.ids.numpy(), b.index.ids.numpy())


def test_a_tampered_program_byte_anywhere_is_refused(published, tmp_path):
    import shutil

    _, _, _, snap = published
    size = (snap / "program.pt2").stat().st_size
    for i, position in enumerate((0, size // 3, size - 1)):
        bad = tmp_path / f"snap{i}"
        shutil.copytree(snap, bad)
        raw = bytearray((bad / "program.pt2").read_bytes())
        raw[position] = (raw[position] + 1) % 256
        (bad / "program.pt2").write_bytes(bytes(raw))
        with pytest.raises(SnapshotError, match="program.pt2"):
            publishing.load_model(bad)


def test_a_bad_formula_fails_before_the_work(published, tmp_path, monkeypatch):
    """A formula that does not parse fails at publish before the catalogue is even encoded."""
    _, data, ckpt, _ = published
    calls = []
    monkeypatch.setattr(publishing, "encode_catalog", lambda *a, **k: calls.append(1))
    for formula in ("click +", "click + 0.5*views", "clamp(click, 1)", "log(0) + click"):
        with pytest.raises(FormulaError):
            publishing.publish(ckpt, data / "items.parquet", tmp_path / "snap", value_formula=formula, export=True)
    assert not calls and not (tmp_path / "snap").exists()


def test_the_published_cache_and_weights_are_the_checkpoints(published):
    """The snapshot's embedding cache is, row by row in the index's order, the checkpoint's item
    tower output rounded to fp16 followed by its OverArch's item state; the towers' weights are
    the checkpoint's; the index stores those embeddings."""
    from sterling.data.items import read_items
    from sterling.models.towers import ItemTerms
    from sterling.train.checkpoint import load_checkpoint
    from sterling.train.encode import encode_catalog

    _, data, ckpt_path, snap = published
    ckpt = load_checkpoint(ckpt_path)
    model = publishing.load_model(snap)
    item_ids, attributes, _ = read_items(data / "items.parquet")
    vectors = encode_catalog(ckpt.model, ItemTerms.build(attributes, vocab=ckpt.term_vocab), len(item_ids))
    position = {int(i): r for r, i in enumerate(item_ids.tolist())}
    rows = [position[int(i)] for i in model.index.ids]  # segment order → catalogue rows
    assert (
        rows != sorted(rows) and model.index.executor_tensors()["centroids"].shape[0] == 8 and model.config.nprobe == 2
    )
    with torch.no_grad():
        want = ckpt.overarch.item_state(vectors[rows].to(torch.float16).float()).to(torch.float16)
    assert model.static_tensors()["cache"].dtype == torch.float16 and torch.equal(model.static_tensors()["cache"], want)
    stored = model.index.executor_tensors()["codes"].float() * model.index.executor_tensors()["scales"][:, None]
    assert (stored - vectors[rows]).abs().max() < 0.02  # int8 codes of the same vectors
    for name, value in ckpt.model.user_tower.state_dict().items():
        assert torch.equal(model.user_tower.state_dict()[name], value)
    for name, value in ckpt.model.query_heads.state_dict().items():
        assert torch.equal(model.task_queries.state_dict()[name], value)
    for name, value in ckpt.overarch.state_dict().items():
        assert torch.equal(model.overarch.state_dict()[name], value)
    assert model.config.primary_task == ckpt.meta["train"]["retrieval_task"]  # None: the first task


def test_the_published_index_probes_part_of_the_lists(published):
    _, _, _, snap = published
    model = publishing.load_model(snap)
    plan = model.plan(3, [None, "language:en", None])
    assert (plan.probes < 8).all() and (plan.probes >= 2).all()


def test_run_program_checks_k(published):
    _, _, _, snap = published
    loaded = publishing.load_model(snap)
    program = load_program((snap / "program.pt2").read_bytes())
    inputs = loaded.inputs([[int(loaded.index.ids[0])], []])
    plan = loaded.plan(2, None)
    for k, message in (
        (0, "k must be an int >= 1"),
        (True, "k must be an int >= 1"),
        (61, "more than the program's 60"),
    ):
        with pytest.raises(ValueError, match=message):
            run_program(program, inputs, plan.probes, plan.allowed, k)
