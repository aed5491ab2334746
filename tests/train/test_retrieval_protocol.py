"""Retrieval training options (issue 21): the full softmax, the logQ-corrected sampled softmax, the
evaluation with seen items excluded, the cut-offs, the warm-up and the CLI flags."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.cli import main
from sterling.data.synth import SynthConfig, generate
from sterling.train.retrieval import (
    UNSEEN,
    RetrievalConfig,
    SequenceRetriever,
    Sequences,
    batch_loss,
    candidate_log_q,
    full_softmax_loss,
    leave_last_out,
    lr_schedule,
    popularity_ranks,
    query_ranks,
    sampled_softmax_loss,
    train_retrieval,
)
from sterling.train.sequence_checkpoint import load_sequence_checkpoint
from sterling.train.sequence_loss import FusedSoftmaxCrossEntropy, reference_cross_entropy
from sterling.train.sequence_model import FULL_SOFTMAX_LOGITS

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------------------- losses


def test_full_softmax_is_cross_entropy_over_every_item_per_head():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(6, 3, 4, dtype=torch.float64), dim=-1)  # [P, H, D]
    vectors = F.normalize(torch.randn(9, 4, dtype=torch.float64), dim=-1)
    targets = torch.tensor([0, 8, 3, 3, 5, 1])
    counts = torch.tensor([[1, 1, 0]] * 3 + [[1, 0, 0]] * 3, dtype=torch.bool)  # head 2 counts none
    tau = 0.3
    got = full_softmax_loss(q, targets, vectors, tau, counts)
    for h in range(3):
        terms = []
        for p in range(6):
            if not counts[p, h]:
                continue
            logits = [float(q[p, h] @ vectors[i]) / tau for i in range(9)]
            terms.append(math.log(sum(math.exp(v) for v in logits)) - logits[int(targets[p])])
        expected = sum(terms) / len(terms) if terms else 0.0
        assert float(got[h]) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    every = full_softmax_loss(q, targets, vectors, tau)
    assert float(every[1]) != pytest.approx(float(got[1]))  # counts matter


def test_batch_loss_without_negatives_is_the_full_softmax():
    torch.manual_seed(0)
    model = SequenceRetriever(20, RetrievalConfig(dim=8, num_layers=1, max_len=10, dropout=0.0)).double()
    items, offsets = torch.tensor([3, 7, 9, 1, 4, 4, 12, 19]), torch.tensor([0, 5, 8])
    batch = Sequences(items, torch.arange(8) * 10, offsets, torch.tensor([0, 1]))
    anchor = torch.tensor([0, 1, 2, 3, 5, 6])
    queries = model(items, batch.ts, offsets)[anchor]
    expected = F.cross_entropy(queries @ model.item_vectors().T / model.cfg.temperature, items[anchor + 1])
    torch.testing.assert_close(batch_loss(model, batch, None), expected)
    assert abs(batch_loss(model, batch, torch.tensor([0, 2])).item() - expected.item()) > 1e-3  # sampled differs


def test_log_q_is_subtracted_from_every_candidate_logit():
    angles = torch.tensor([0.0, 0.7, 1.9, 2.8, 4.0, 5.1], dtype=torch.float64)
    table = torch.stack([angles.cos(), angles.sin()], 1)
    seq_items, seq_offsets = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 3, 5])
    q = F.normalize(torch.tensor([[1.0, 0.2], [0.3, 1.0], [-0.8, -0.4]], dtype=torch.float64), dim=1)
    targets, owner, negatives = torch.tensor([1, 2, 4]), torch.tensor([0, 0, 1]), torch.tensor([5, 0])
    log_q = torch.log(torch.tensor([0.1, 0.5, 0.2, 0.9, 0.3, 0.05], dtype=torch.float64))
    tau = 0.5
    got = sampled_softmax_loss(q, targets, owner, seq_items, seq_offsets, negatives, lambda r: table[r], tau, log_q)
    allowed = [[1, 4, 5], [2, 4, 5], [0, 1, 2, 4, 5]]  # same-user items masked, as without the correction
    terms = []
    for p, cands in enumerate(allowed):
        logit = {c: float(q[p] @ table[c]) / tau - float(log_q[c]) for c in cands}
        terms.append(math.log(sum(math.exp(v) for v in logit.values())) - logit[int(targets[p])])
    assert got.item() == pytest.approx(sum(terms) / 3, rel=1e-12)
    plain = sampled_softmax_loss(q, targets, owner, seq_items, seq_offsets, negatives, lambda r: table[r], tau)
    assert abs(plain.item() - got.item()) > 1e-3


def test_candidate_log_q_is_the_chance_of_being_a_candidate():
    # a batch: 3 targets drawn by popularity and 2 uniform negatives, de-duplicated
    counts = torch.tensor([50, 30, 15, 5, 0])
    got = candidate_log_q(counts, positions=3, num_negatives=2).exp().double()
    rng = np.random.default_rng(0)
    p = counts.numpy() / counts.sum().item()
    trials = 20_000
    seen = np.zeros(5)
    for _ in range(trials):
        drawn = set(rng.choice(5, 3, p=p)) | set(rng.integers(0, 5, 2))
        seen[list(drawn)] += 1
    np.testing.assert_allclose(got.numpy(), seen / trials, atol=0.015)
    assert got[4] > 0  # never a target: the uniform draw's chance


# ------------------------------------------------------------------------------- evaluation


def _random_split(seed: int, num_items: int = 30, repeats: bool = True):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 14, 9)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    items = rng.integers(0, num_items if repeats else 10 * num_items, offsets[-1]) % num_items
    ts = np.arange(offsets[-1]) * 7
    return leave_last_out(offsets, items, ts, max_len=4), items, offsets


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_ranks_with_seen_items_excluded_equal_brute_force(seed):
    torch.manual_seed(seed)
    num_items = 30
    split, items, offsets = _random_split(seed, num_items)
    model = SequenceRetriever(num_items, RetrievalConfig(dim=8, num_layers=1, max_len=4)).double().eval()
    for data in (split.valid, split.test):
        got = query_ranks(model, data, chunk=2, exclude_seen=True)[:, 0]
        full = query_ranks(model, data, chunk=3)[:, 0]
        with torch.no_grad():
            h = data.history
            queries = model(h.items, h.ts, h.offsets, data.target_ts)[h.offsets[1:] - 1]
            scores = queries @ model.item_vectors().T
        for u in range(len(data)):
            target = int(data.targets[u])
            user = int(h.users[u])
            # every item of the user's timeline before the target (not only the last max_len)
            start = int(offsets[user])
            end = start + int((data.seen_offsets[u + 1] - data.seen_offsets[u]).item())
            seen = set(items[start:end].tolist()) - {target}
            s = scores[u].clone()
            s[list(seen)] = float("-inf")
            assert int(got[u]) == int((s > s[target]).sum())
            assert int(full[u]) == int((scores[u] > scores[u, target]).sum())
            assert int(got[u]) <= int(full[u])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_popularity_ranks_with_seen_items_excluded_equal_brute_force(seed):
    num_items = 30
    split, items, offsets = _random_split(seed, num_items)
    got = popularity_ranks(split.train, split.test, num_items, exclude_seen=True)
    full = popularity_ranks(split.train, split.test, num_items)
    for u in range(len(split.test)):
        target = int(split.test.targets[u])
        a, b = int(split.test.seen_offsets[u]), int(split.test.seen_offsets[u + 1])
        seen = set(split.test.seen_items[a:b].tolist()) - {target}
        # the list is the same for everyone; the user's seen items leave it
        order = [i for i in _popular_order(split.train, num_items) if i not in seen]
        assert int(got[u]) == order.index(target)
        assert int(full[u]) == _popular_order(split.train, num_items).index(target)


def _popular_order(train: Sequences, num_items: int) -> list[int]:
    counts = [0] * num_items
    o = train.offsets.tolist()
    for a, b in zip(o[:-1], o[1:]):
        for t in train.items[a + 1 : b].tolist():
            counts[t] += 1
    return sorted(range(num_items), key=lambda i: (-counts[i], i))


def test_seen_items_are_the_whole_history_not_the_last_max_len():
    offsets = np.array([0, 8])
    items = np.arange(8)
    split = leave_last_out(offsets, items, items * 10, max_len=3)
    assert split.test.history.items.tolist() == [4, 5, 6]  # the model reads the last max_len
    assert split.test.seen_items.tolist() == list(range(7)) and split.test.seen_offsets.tolist() == [0, 7]
    assert split.valid.seen_items.tolist() == list(range(6))


# ---------------------------------------------------------------------------------- options


def test_config_resolves_the_loss_and_always_reports_cutoff_10():
    assert RetrievalConfig(cutoffs=(20, 5)).cutoffs == (5, 10, 20)
    cfg = RetrievalConfig(batch_size=128, max_len=200)
    fits = FULL_SOFTMAX_LOGITS // (128 * 200)
    assert cfg.resolved_loss(fits) == "full" and cfg.resolved_loss(fits + 1) == "sampled"
    assert RetrievalConfig(loss="sampled").resolved_loss(10) == "sampled"
    assert RetrievalConfig(loss="full").resolved_loss(10**9) == "full"
    bad_configs = (
        {"loss": "softmax"},
        {"cutoffs": ()},
        {"cutoffs": (0,)},
        {"warmup_steps": -1},
        {"lr_decay": "linear"},
        {"holdout": 0},
        {"holdout": 1, "patience": 3},
        {"train_events": "earlier"},
        {"dim": 50, "num_heads": 3},
    )
    for bad in bad_configs:
        with pytest.raises(ValueError):
            RetrievalConfig(**bad)


def _lrs(warmup: int, decay: int | None, steps: int) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=1e-2)
    schedule = lr_schedule(opt, warmup, decay)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    return lrs


def test_warmup_ramps_the_learning_rate_linearly_then_holds():
    assert _lrs(3, None, 6) == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])
    assert _lrs(0, None, 2) == pytest.approx([1e-2, 1e-2])


def test_cosine_decay_follows_the_warmup_down_to_zero():
    lrs = _lrs(2, 10, 12)
    assert lrs[:2] == pytest.approx([1e-2 / 3, 2e-2 / 3])
    # from step 2 on: the cosine from the peak (step 2) to 0 at step 10, then 0
    expected = [1e-2 * 0.5 * (1 + math.cos(math.pi * (i - 2) / 8)) for i in range(2, 11)] + [0.0]
    assert lrs[2:] == pytest.approx(expected, abs=1e-12)
    assert lrs[2] == pytest.approx(1e-2) and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    cfg = SynthConfig(num_users=80, num_items=120, history_length=(10, 30), requests_per_user=(1, 3), seed=3)
    return generate(cfg, tmp_path_factory.mktemp("protocol") / "synth")


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_training_reports_both_protocols_at_the_cutoffs(synth, loss):
    cfg = RetrievalConfig(
        dim=8,
        num_layers=1,
        max_len=20,
        epochs=2,
        batch_size=32,
        loss=loss,
        num_negatives=16,
        warmup_steps=2,
        cutoffs=(5, 20),
        exclude_seen=True,
    )
    lines = []
    report = train_retrieval(synth, cfg, log=lines.append)
    expected = {f"{m}@{k}" for k in (5, 10, 20) for m in ("hr", "ndcg")} | {"mrr"}
    assert set(report.test) == expected | {UNSEEN + k for k in expected}
    assert set(report.popular_test) == set(report.test)
    for key in expected:  # removing seen items can only lift the target
        if key.startswith("hr"):
            assert report.test[UNSEEN + key] >= report.test[key]
    assert ("full softmax" in lines[0]) == (loss == "full") and "threads" in lines[0]


def test_holdout_1_reports_the_last_model_and_writes_it_as_best(synth, tmp_path):
    cfg = RetrievalConfig(dim=8, num_layers=1, max_len=20, epochs=2, batch_size=32, holdout=1, lr_decay="cosine")
    lines = []
    report = train_retrieval(synth, cfg, log=lines.append, out_dir=tmp_path / "ckpt")
    two = train_retrieval(synth, replace(cfg, holdout=2), log=lambda _: None)
    assert report.valid == {} and report.best_epoch is None and report.last_test == {}
    assert "holdout 1" in lines[0]
    assert report.train_events > two.train_events  # the validation targets are trained on
    assert all("valid" not in point for point in report.curve)
    best = load_sequence_checkpoint(tmp_path / "ckpt" / "best")
    last = load_sequence_checkpoint(tmp_path / "ckpt" / "last")
    assert best.meta["epoch"] == last.meta["epoch"] == 2 and best.meta["metrics"]["test"] == report.test
    for (name, a), (_, b) in zip(best.model.state_dict().items(), last.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_cli_cutoffs_exclude_seen_and_threads(synth, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["train", "--model", "sasrec", "--data", str(synth), "--max-steps", "2", "--dim", "8"]
    argv += ["--layers", "1", "--max-len", "20", "--cutoffs", "5,20", "--exclude-seen", "--threads", "1"]
    assert main([*argv, "--loss", "sampled", "--negatives", "8", "--warmup-steps", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "HR@5" in printed and "HR@20" in printed and "unseen" in printed
    report = json.loads(out.read_text())
    assert report["config"]["loss"] == "sampled" and report["config"]["num_negatives"] == 8
    assert report["config"]["cutoffs"] == [5, 10, 20] and "unseen/ndcg@20" in report["test"]
    assert torch.get_num_threads() == 1
    flags = ["--holdout", "1", "--lr-decay", "cosine", "--query-time", "event", "--tie-order", "stored"]
    flags += ["--train-events", "all", "--heads", "2"]
    assert main([*argv, *flags, "--out", str(tmp_path / "h1"), "--json", str(out)]) == 0
    assert "(the last model)" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["config"]["holdout"] == 1 and report["config"]["lr_decay"] == "cosine" and report["valid"] == {}
    assert report["config"]["query_time"] == "event" and report["config"]["tie_order"] == "stored"
    assert report["config"]["train_events"] == "all" and report["config"]["num_heads"] == 2
    assert main([*argv, "--holdout", "1", "--patience", "2"]) == 2
    assert "holdout 1 trains on the validation targets" in capsys.readouterr().err
    assert main([*argv[:7], "--cutoffs", "5,x"]) == 2
    assert "--cutoffs takes comma-separated integers" in capsys.readouterr().err
    assert main(["train", "--data", str(synth), "--out", str(tmp_path / "c"), "--exclude-seen"]) == 2
    assert "--exclude-seen" in capsys.readouterr().err


@settings(max_examples=25, deadline=None)
@given(
    p=st.integers(1, 40), n=st.integers(1, 30), d=st.integers(1, 6), chunk=st.integers(1, 16), seed=st.integers(0, 999)
)
def test_fused_cross_entropy_equals_the_plain_one_with_its_gradients(p, n, d, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(p, d, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(n, d, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(n, (p,), generator=g)
    scale = float(torch.rand((), generator=g, dtype=torch.float64) * 20 + 0.1)
    upstream = float(torch.randn((), generator=g, dtype=torch.float64))
    fused = FusedSoftmaxCrossEntropy.apply(q, v, targets, scale, chunk)
    (fused * upstream).backward()
    got = (q.grad.clone(), v.grad.clone())
    q.grad, v.grad = None, None
    plain = reference_cross_entropy(q, v, targets, scale)
    (plain * upstream).backward()
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[0], q.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], v.grad, rtol=1e-10, atol=1e-12)
