"""Multi-task retrieval training of the HSTU / SASRec towers: per-task queries over the encoder's
output, each trained only on the positions whose next event carries its action bit; the split
carries the actions; per-task HR@10; the checkpoint round-trips the task names and heads; the CLI."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sterling.cli import main
from sterling.data.synth import SynthConfig, generate
from sterling.train.retrieval import (
    RetrievalConfig,
    SequenceRetriever,
    Sequences,
    batch_loss,
    leave_last_out,
    load_task_names,
    multi_task_loss,
    query_ranks,
    sampled_softmax_loss,
    task_bits,
    task_metrics,
    train_retrieval,
)
from sterling.train.sequence_checkpoint import load_sequence_checkpoint, write_sequence_checkpoint
from sterling.train.sequence_model import NEXT

TASKS = ("click", "like", "share")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------------------- loss


def _circle():
    angles = torch.tensor([0.0, 0.7, 1.9, 2.8, 4.0, 5.1], dtype=torch.float64)
    table = torch.stack([angles.cos(), angles.sin()], 1)
    return table, (lambda rows: table[rows])


def test_each_task_loss_counts_exactly_the_positions_with_its_positive():
    # six items on the unit circle; user A = [0, 1, 2], user B = [3, 4]; trained positions predict
    # 1 (A), 2 (A), 4 (B); three heads: next (every position), "like" (positions 0 and 2), "share" (none)
    table, embed = _circle()
    seq_items, seq_offsets = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 3, 5])
    targets, owner = torch.tensor([1, 2, 4]), torch.tensor([0, 0, 1])
    negatives = torch.tensor([5, 0, 1, 5])
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 3, 2, generator=g, dtype=torch.float64), dim=-1)  # [P, H, D]
    counts = torch.tensor([[True, True, False], [True, False, False], [True, True, False]])
    tau = 0.5
    losses = multi_task_loss(q, targets, counts, owner, seq_items, seq_offsets, negatives, embed, tau)
    assert losses.shape == (3,)

    # hand reference: candidates {0, 1, 2, 4, 5}; a user's own items other than its target are out
    allowed = [[1, 4, 5], [2, 4, 5], [0, 1, 2, 4, 5]]

    def reference(h, positions):
        terms = []
        for p in positions:
            logit = lambda c, p=p: float(q[p, h] @ table[c]) / tau  # noqa: E731
            terms.append(math.log(sum(math.exp(logit(c)) for c in allowed[p])) - logit(int(targets[p])))
        return sum(terms) / len(terms)

    assert losses[0].item() == pytest.approx(reference(0, [0, 1, 2]), rel=1e-12)
    assert losses[1].item() == pytest.approx(reference(1, [0, 2]), rel=1e-12)
    assert losses[2].item() == 0.0  # no positive in the batch: the head adds nothing
    assert abs(losses[1].item() - reference(1, [0, 1, 2])) > 1e-3  # the masking matters here
    # the head counting every position is the single-task loss of its queries
    single = sampled_softmax_loss(q[:, 0], targets, owner, seq_items, seq_offsets, negatives, embed, tau)
    assert losses[0].item() == single.item()

    # a masked position's query gets no gradient from its head (and changing it changes nothing)
    q = q.clone().requires_grad_(True)
    multi_task_loss(q, targets, counts, owner, seq_items, seq_offsets, negatives, embed, tau).sum().backward()
    assert q.grad[1, 1].abs().sum() == 0 and q.grad[:, 2].abs().sum() == 0
    assert q.grad[0, 1].abs().sum() > 0 and q.grad[1, 0].abs().sum() > 0


def test_task_bits_read_bit_j_as_task_j():
    actions = torch.tensor([0, 1, 2, 3, 4, 7, 5])
    assert task_bits(actions, 3).int().tolist() == [
        [0, 0, 0],
        [1, 0, 0],
        [0, 1, 0],
        [1, 1, 0],
        [0, 0, 1],
        [1, 1, 1],
        [1, 0, 1],
    ]
    assert task_bits(torch.tensor([2, 3]), 2).tolist() == [[False, True], [True, True]]  # MovieLens like / love


def _model(tasks=TASKS, encoder="hstu", seed=0, num_items=30):
    torch.manual_seed(seed)
    cfg = RetrievalConfig(encoder=encoder, dim=8, num_layers=1, max_len=10, dropout=0.0, multi_task=bool(tasks))
    model = SequenceRetriever(num_items, cfg, tasks)
    with torch.no_grad():  # task heads away from their zero initialisation
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_batch_loss_is_next_plus_each_task_on_its_bits():
    model = _model()
    # two sequences; the action of the event each position predicts decides the tasks it counts for
    items = torch.tensor([3, 7, 9, 1, 4, 4, 12, 20])
    actions = torch.tensor([1, 3, 1, 7, 0, 1, 5, 3])
    offsets = torch.tensor([0, 5, 8])
    batch = Sequences(items, torch.arange(8) * 10, offsets, torch.tensor([0, 1]), actions)
    negatives = torch.tensor([0, 2, 25])
    loss = batch_loss(model, batch, negatives)

    queries = model(items, batch.ts, offsets)
    anchor = torch.tensor([0, 1, 2, 3, 5, 6])  # every position with a next event
    next_actions = actions[anchor + 1]  # [3, 1, 7, 0, 5, 3]
    counts = torch.tensor(
        [
            [1, 1, 1, 0],  # 3: click, like
            [1, 1, 0, 0],  # 1: click
            [1, 1, 1, 1],  # 7: all
            [1, 0, 0, 0],  # 0: next only
            [1, 1, 0, 1],  # 5: click, share
            [1, 1, 1, 0],  # 3: click, like
        ],
        dtype=torch.bool,
    )
    assert torch.equal(torch.cat([torch.ones(6, 1, dtype=torch.bool), task_bits(next_actions, 3)], 1), counts)
    owner = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])[anchor]
    args = (items[anchor + 1], owner, items, offsets, negatives, model.item_vectors, model.cfg.temperature)
    heads = model.all_queries(queries[anchor])  # [P, 4, D]
    expected = sampled_softmax_loss(heads[:, 0], *args)
    for h in range(1, 4):  # each task alone over its positions, against the batch's candidates
        alone = multi_task_loss(heads[:, h : h + 1], args[0], counts[:, h : h + 1], *args[1:])
        expected = expected + alone[0]
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)

    with pytest.raises(ValueError, match="actions"):
        batch_loss(model, Sequences(items, batch.ts, offsets, batch.users), negatives)
    # a single-task model ignores the actions: its loss is the plain next-item loss
    single = _model(tasks=())
    plain = batch_loss(single, Sequences(items, batch.ts, offsets, batch.users), negatives)
    assert torch.equal(plain, batch_loss(single, batch, negatives))


def test_the_model_checks_its_tasks_and_orders_its_queries():
    with pytest.raises(ValueError, match="task names"):
        SequenceRetriever(10, RetrievalConfig(dim=4, multi_task=True))
    with pytest.raises(ValueError, match="task names"):
        SequenceRetriever(10, RetrievalConfig(dim=4), ("click",))
    with pytest.raises(ValueError, match="distinct"):
        SequenceRetriever(10, RetrievalConfig(dim=4, multi_task=True), ("click", NEXT))
    fresh = SequenceRetriever(10, RetrievalConfig(dim=4, multi_task=True), ("like", "love"))
    assert fresh.query_names == ("next", "like", "love")
    q = F.normalize(torch.randn(5, 4), dim=-1)
    heads = fresh.all_queries(q)
    assert heads.shape == (5, 3, 4)
    torch.testing.assert_close(heads, q[:, None].expand(5, 3, 4))  # zero-initialised residuals
    single = SequenceRetriever(10, RetrievalConfig(dim=4))
    assert single.task_queries is None and "task_queries.proj.weight" not in single.state_dict()


# ------------------------------------------------------------------------------- split, metrics


def test_the_split_carries_the_actions_of_its_events_and_targets():
    lengths = [1, 2, 3, 7]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = np.arange(offsets[-1], dtype=np.int64)
    actions = (items * 5) % 8  # an event's action names it
    split = leave_last_out(offsets, items, 10 * items, max_len=4, actions=actions)
    assert torch.equal(split.train.actions, (split.train.items * 5) % 8)
    for held in (split.valid, split.test):
        assert torch.equal(held.history.actions, (held.history.items * 5) % 8)
        assert torch.equal(held.target_actions, (held.targets * 5) % 8)
    rows = split.train.rows(torch.tensor([1, 0]))
    assert torch.equal(rows.actions, (rows.items * 5) % 8)
    plain = leave_last_out(offsets, items, 10 * items, max_len=4)
    assert plain.train.actions is None and plain.test.target_actions is None
    assert torch.equal(plain.train.items, split.train.items)


def test_task_metrics_count_only_the_targets_with_the_task():
    ranks = torch.tensor([[0, 20, 3], [15, 2, 40], [5, 5, 5], [30, 30, 0]])  # [B, next + 2 tasks]
    actions = torch.tensor([1, 1, 3, 0])
    out = task_metrics(ranks, actions, ("like", "love"))
    assert out == {
        "hr@10:like": pytest.approx(2 / 3),  # users 0, 1, 2: ranks 20, 2, 5
        "hr@10:like(next)": pytest.approx(2 / 3),  # 0, 15, 5
        "hr@10:love": 1.0,  # user 2 only
        "hr@10:love(next)": 1.0,
    }
    assert task_metrics(ranks, torch.tensor([1, 1, 1, 0]), ("like", "love")).keys() == {
        "hr@10:like",
        "hr@10:like(next)",
    }  # no target has love: left out, never NaN


def test_query_ranks_rank_each_head_over_the_whole_corpus():
    model = _model(encoder="sasrec").double().eval()
    rng = np.random.default_rng(0)
    offsets = np.array([0, 6, 10, 17])
    items = rng.integers(0, 30, offsets[-1])
    split = leave_last_out(offsets, items, np.arange(offsets[-1]), max_len=10, actions=rng.integers(0, 8, offsets[-1]))
    ranks = query_ranks(model, split.test, chunk=2)
    assert ranks.shape == (3, 4)
    vectors = model.item_vectors()
    for u in range(3):
        one = split.test.history.rows(torch.tensor([u]))
        with torch.no_grad():
            heads = model.all_queries(model(one.items, one.ts, one.offsets)[-1:])[0]  # [4, D]
        for h in range(4):
            scores = vectors @ heads[h]
            assert ranks[u, h] == int((scores > scores[split.test.targets[u]]).sum())


# ----------------------------------------------------------------------------------- checkpoint


@pytest.mark.parametrize("encoder", ["hstu", "sasrec"])
def test_a_multi_task_checkpoint_round_trips(tmp_path, encoder):
    model = _model(encoder=encoder).eval()
    item_ids = np.arange(30, dtype=np.int64) * 3 + 7
    path = write_sequence_checkpoint(tmp_path / "ckpt", model, item_ids, {"epoch": 2})
    ckpt = load_sequence_checkpoint(path)
    assert ckpt.model.tasks == TASKS and ckpt.meta["tasks"] == list(TASKS)
    assert ckpt.model.cfg == model.cfg and ckpt.model.cfg.multi_task
    assert np.array_equal(ckpt.item_ids, item_ids)
    for name, value in model.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[name], value), name
    assert torch.count_nonzero(ckpt.model.task_queries.proj.weight) > 0
    items, ts, offsets = torch.tensor([1, 5, 9, 2, 8]), torch.tensor([0, 5, 9, 10, 30]), torch.tensor([0, 3, 5])
    with torch.no_grad():
        want = model.all_queries(model(items, ts, offsets))
        torch.testing.assert_close(ckpt.model.all_queries(ckpt.model(items, ts, offsets)), want, rtol=0, atol=0)

    single = write_sequence_checkpoint(tmp_path / "single", _model(tasks=()), item_ids, {})
    loaded = load_sequence_checkpoint(single)
    assert loaded.model.tasks == () and loaded.meta["tasks"] == [] and loaded.model.task_queries is None
    with pytest.raises(ValueError, match="tasks"):
        write_sequence_checkpoint(tmp_path / "x", model, item_ids, {"tasks": ["a"]})


def test_a_checkpoint_without_task_names_is_single_task(tmp_path):
    """Checkpoints written before multi-task training have no ``tasks`` (nor ``multi_task``)."""
    from sterling.snapshot import read_snapshot, write_snapshot

    path = write_sequence_checkpoint(tmp_path / "ckpt", _model(tasks=()), np.arange(30, dtype=np.int64), {})
    snap = read_snapshot(path)
    meta = {k: v for k, v in snap.meta.items() if k != "tasks"}
    meta["retrieval"] = {k: v for k, v in meta["retrieval"].items() if k != "multi_task"}
    old = write_snapshot(tmp_path / "old", {"model": dict(snap.tensors["model"])}, meta)
    assert load_sequence_checkpoint(old).model.tasks == ()


# --------------------------------------------------------------------------------- training, CLI


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    cfg = SynthConfig(num_users=60, num_items=80, history_length=(5, 15), requests_per_user=(1, 2), seed=5)
    return generate(cfg, tmp_path_factory.mktemp("multitask") / "synth")


def test_multi_task_training_reports_per_task_hr_and_writes_its_heads(synth, tmp_path):
    assert load_task_names(synth) == TASKS
    cfg = RetrievalConfig(
        encoder="hstu", dim=8, num_layers=1, max_len=10, epochs=2, batch_size=16, num_negatives=8, multi_task=True
    )
    report = train_retrieval(synth, cfg, log=lambda _: None, out_dir=tmp_path / "ckpt", json_path=tmp_path / "r.json")
    assert report.tasks == TASKS
    for metrics in (report.valid, report.test):
        assert {"hr@10", "ndcg@10", "hr@10:click", "hr@10:click(next)"} <= set(metrics)
        # synthetic timelines are clicks: the click task's held-out users are every user
        assert metrics["hr@10:click(next)"] == metrics["hr@10"]
    ckpt = load_sequence_checkpoint(tmp_path / "ckpt" / "best")
    assert ckpt.model.tasks == TASKS and ckpt.meta["metrics"]["test"] == report.test
    assert torch.count_nonzero(ckpt.model.task_queries.proj.weight) > 0  # the heads trained
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["tasks"] == list(TASKS) and saved["config"]["multi_task"] is True


def test_single_task_training_reports_no_task_metrics(synth):
    cfg = RetrievalConfig(encoder="sasrec", dim=8, num_layers=1, max_len=10, epochs=1, batch_size=16, num_negatives=8)
    report = train_retrieval(synth, cfg, log=lambda _: None)
    assert report.tasks == () and not any(":" in k for k in report.test)


def test_cli_multi_task(synth, tmp_path, capsys):
    argv = ["train", "--model", "sasrec", "--data", str(synth), "--multi-task", "--epochs", "1", "--dim", "8"]
    assert main([*argv, "--max-len", "10", "--layers", "1", "--json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "HR@10 per task" in printed and "like" in printed and "share" in printed
    assert json.loads((tmp_path / "r.json").read_text())["tasks"] == list(TASKS)
    assert main(["train", "--data", str(synth), "--out", str(tmp_path / "tt"), "--multi-task"]) == 2
    assert "--multi-task" in capsys.readouterr().err
