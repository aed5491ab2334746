"""Retrieval training of the HSTU / SASRec user towers: the leave-last-out split, the masked sampled
softmax, the full-corpus evaluation, a smoke run that learns, and the CLI."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.cli import main
from sterling.data.synth import SynthConfig, generate
from sterling.train.retrieval import (
    EvalSet,
    RetrievalConfig,
    SequenceRetriever,
    Sequences,
    evaluate_ranks,
    leave_last_out,
    load_timelines,
    ranking_metrics,
    sampled_softmax_loss,
    train_retrieval,
)
from sterling.train.sequence_model import LENGTH_GROUP
from sterling.train.sequence_split import earlier_windows, shuffled_ties

ML100K = Path("/work/shared/data/ml-100k")


def _timelines(lengths):
    """Timelines whose item of event e is e itself (so an item names its event) and ts = 10·e."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    events = np.arange(offsets[-1], dtype=np.int64)
    return offsets, events, 10 * events


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _rows(seqs: Sequences):
    o = seqs.offsets.tolist()
    return [seqs.items[a:b].tolist() for a, b in zip(o[:-1], o[1:])]


# ---------------------------------------------------------------------------------------- split


def test_split_is_leave_last_out_and_never_leaks():
    lengths = [1, 2, 3, 7, 12]
    offsets, items, ts = _timelines(lengths)
    split = leave_last_out(offsets, items, ts, max_len=4)
    ev = {u: list(range(offsets[u], offsets[u + 1])) for u in range(len(lengths))}

    # users with >= 3 events train on all but their last two (the most recent max_len of them); a
    # sequence needs two events to train on: user 0 (one event) and user 2 (3 - 2 events) have none;
    # user 1 (two events) trains on both and is not evaluated
    assert split.train.users.tolist() == [1, 3, 4]
    assert _rows(split.train) == [ev[1], ev[3][:-2][-4:], ev[4][:-2][-4:]]
    assert torch.equal(split.train.ts, 10 * split.train.items)
    for held, back in ((split.valid, 2), (split.test, 1)):
        assert held.history.users.tolist() == [2, 3, 4]
        assert held.targets.tolist() == [ev[u][-back] for u in (2, 3, 4)]
        assert _rows(held.history) == [ev[u][:-back][-4:] for u in (2, 3, 4)]

    # no validation / test target, nor anything after it, is trained on or in its own history
    train_rows = dict(zip(split.train.users.tolist(), _rows(split.train)))
    for user, target, history in zip(
        split.valid.history.users.tolist(), split.valid.targets.tolist(), _rows(split.valid.history)
    ):
        assert max(train_rows.get(user, [-1])) < target and max(history) < target
    for user, target, history in zip(
        split.test.history.users.tolist(), split.test.targets.tolist(), _rows(split.test.history)
    ):
        assert max(train_rows.get(user, [-1])) < target - 1 and max(history) < target
        assert history[-1] == target - 1  # the test history includes the validation item


def test_holdout_1_trains_on_all_but_the_test_target():
    lengths = [1, 2, 3, 7, 12]
    offsets, items, ts = _timelines(lengths)
    split = leave_last_out(offsets, items, ts, max_len=4, holdout=1)
    ev = {u: list(range(offsets[u], offsets[u + 1])) for u in range(len(lengths))}
    # GR's split: evaluated users (>= 3 events) train on all but their last event
    assert split.train.users.tolist() == [1, 2, 3, 4]
    assert _rows(split.train) == [ev[1], ev[2][:-1], ev[3][:-1][-4:], ev[4][:-1][-4:]]
    two = leave_last_out(offsets, items, ts, max_len=4)  # the test set does not depend on the holdout
    assert torch.equal(split.test.targets, two.test.targets) and _rows(split.test.history) == _rows(two.test.history)
    for user, target in zip(split.test.history.users.tolist(), split.test.targets.tolist()):
        assert max(dict(zip(split.train.users.tolist(), _rows(split.train)))[user]) == target - 1
    with pytest.raises(ValueError, match="holdout"):
        leave_last_out(offsets, items, ts, max_len=4, holdout=3)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 30), min_size=1, max_size=6),
    max_len=st.integers(2, 7),
    holdout=st.sampled_from([1, 2]),
)
def test_all_train_events_make_every_training_event_a_target_once(lengths, max_len, holdout):
    offsets, items, ts = _timelines(lengths)
    latest = leave_last_out(offsets, items, ts, max_len=max_len, holdout=holdout)
    split = leave_last_out(offsets, items, ts, max_len=max_len, holdout=holdout, train_events="all")
    rows = _rows(split.train)
    # the latest windows come first, unchanged; the evaluated sets do not depend on the option
    assert rows[: len(latest.train)] == _rows(latest.train)
    assert torch.equal(split.train.users[: len(latest.train)], latest.train.users)
    assert torch.equal(split.test.targets, latest.test.targets) and torch.equal(
        split.test.history.items, latest.test.history.items
    )
    assert torch.equal(split.train.ts, 10 * split.train.items)
    for user in set(latest.train.users.tolist()):
        windows = [r for u, r in zip(split.train.users.tolist(), rows) if u == user]
        assert all(2 <= len(w) <= max_len and w == list(range(w[0], w[-1] + 1)) for w in windows)
        # every trained event of the user but the first is a next-item target (a window's
        # positions after its first) exactly once, and the first is in a window
        first, end = int(offsets[user]), max(w[-1] for w in windows) + 1
        targets = sorted(e for w in windows for e in w[1:])
        assert targets == list(range(first + 1, end)) and min(w[0] for w in windows) == first
        assert end == _rows(latest.train)[latest.train.users.tolist().index(user)][-1] + 1
    with pytest.raises(ValueError, match="train_events"):
        leave_last_out(offsets, items, ts, max_len=max_len, train_events="some")


def test_earlier_windows_step_back_by_max_len_minus_one():
    row, start, end = earlier_windows(np.array([0, 10, 30]), np.array([0, 17, 40]), 4)
    assert row.tolist() == [1, 1, 1, 2, 2, 2, 2]
    assert list(zip(start.tolist(), end.tolist())) == [
        (14, 18),
        (11, 15),
        (10, 12),
        (37, 41),
        (34, 38),
        (31, 35),
        (30, 32),
    ]


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(0, 12), min_size=1, max_size=6), seed=st.integers(0, 999))
def test_shuffled_ties_permute_only_events_of_the_same_second(lengths, seed):
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ts = np.concatenate([np.sort(rng.integers(0, 4, n)) for n in lengths]).astype(np.int64)  # many ties
    items = rng.integers(0, 20, offsets[-1])
    user = np.repeat(np.arange(len(lengths)), lengths)
    stored = np.lexsort((items, ts, user))  # the format's order: (user, ts, item)
    items, ts = items[stored], ts[stored]
    order = shuffled_ties(offsets, items, ts)
    assert sorted(order.tolist()) == list(range(offsets[-1]))
    assert np.array_equal(user[order], user) and np.array_equal(ts[order], ts)  # only within (user, ts) groups
    assert np.array_equal(order, shuffled_ties(offsets, items, ts))  # fixed: the same in every run
    split = leave_last_out(offsets, items, ts, max_len=5, ties="shuffled")
    by_hand = leave_last_out(offsets, items[order], ts[order], max_len=5)
    for got, want in ((split.train, by_hand.train), (split.test.history, by_hand.test.history)):
        assert torch.equal(got.items, want.items) and torch.equal(got.offsets, want.offsets)
    assert torch.equal(split.test.targets, by_hand.test.targets)


def test_shuffled_ties_break_the_item_order_of_a_burst():
    offsets, ts = np.array([0, 30]), np.zeros(30, dtype=np.int64)  # one burst of 30 items
    order = shuffled_ties(offsets, np.arange(30), ts)
    assert sorted(order.tolist()) == list(range(30)) and order.tolist() != list(range(30))
    with pytest.raises(ValueError, match="ties"):
        leave_last_out(offsets, np.arange(30), ts, max_len=4, ties="random")


@pytest.mark.parametrize("encoder", ["hstu", "sasrec"])
def test_a_position_query_does_not_see_its_target(encoder):
    """The query trained to predict item i+1 is a function of items <= i only."""
    torch.manual_seed(0)
    model = SequenceRetriever(50, RetrievalConfig(encoder=encoder, dim=16, max_len=20, dropout=0.0)).eval()
    offsets = torch.tensor([0, 6, 10])
    items = torch.randint(50, (10,))
    ts = torch.arange(10) * 100
    base = model(items, ts, offsets)
    changed = items.clone()
    changed[3:6] = (changed[3:6] + 7) % 50  # sequence 0 from position 3 on
    out = model(changed, ts, offsets)
    torch.testing.assert_close(out[:3], base[:3])
    torch.testing.assert_close(out[6:], base[6:])
    assert not torch.allclose(out[3:6], base[3:6])


@settings(max_examples=8, deadline=None)
@given(
    encoder=st.sampled_from(["hstu", "sasrec"]),
    query_time=st.sampled_from(["request", "event"]),
    lengths=st.lists(st.integers(1, 20), min_size=LENGTH_GROUP + 1, max_size=3 * LENGTH_GROUP),
    seed=st.integers(0, 999),
)
def test_a_batch_grouped_by_length_encodes_each_sequence_as_alone(encoder, query_time, lengths, seed):
    """More sequences than :data:`LENGTH_GROUP` run in groups of similar length, each padded to
    its own longest; every sequence's queries are what it gets alone (no padding at all)."""
    torch.manual_seed(seed)
    cfg = RetrievalConfig(encoder=encoder, dim=8, num_layers=2, max_len=20, dropout=0.0, query_time=query_time)
    model = SequenceRetriever(30, cfg).eval()
    offsets = torch.tensor([0, *np.cumsum(lengths)])
    items, ts = torch.randint(30, (int(offsets[-1]),)), torch.randint(0, 10**6, (int(offsets[-1]),)).sort().values
    request_ts = ts[offsets[1:] - 1] + torch.randint(0, 10**5, (len(lengths),))
    with torch.no_grad():
        batch = model(items, ts, offsets, request_ts)
        for b, (start, stop) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
            alone = model(items[start:stop], ts[start:stop], torch.tensor([0, stop - start]), request_ts[b : b + 1])
            torch.testing.assert_close(batch[start:stop], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("query_time", ["request", "event"])
def test_a_prefix_asked_at_the_next_event_time_is_the_training_query(query_time):
    """Training's position-i query is the evaluation query of the history up to i, asked at the
    next event's time (``request``) or at its own last event's (``event``)."""
    torch.manual_seed(0)
    cfg = RetrievalConfig(dim=16, max_len=20, dropout=0.0, query_time=query_time)
    model = SequenceRetriever(50, cfg).eval()
    items, ts = torch.randint(50, (8,)), torch.cumsum(torch.randint(1, 10**6, (8,)), 0)
    with torch.no_grad():
        full = model(items, ts, torch.tensor([0, 8]))
        for i in range(7):
            prefix = torch.tensor([0, i + 1])
            asked = model(items[: i + 1], ts[: i + 1], prefix, ts[i + 1 : i + 2])[-1]
            torch.testing.assert_close(asked, full[i], rtol=1e-5, atol=1e-6)
            unasked = model(items[: i + 1], ts[: i + 1], prefix)[-1]  # no request time: the last event's
            assert torch.allclose(unasked, full[i], rtol=1e-5, atol=1e-6) == (query_time == "event")


# ----------------------------------------------------------------------------------------- loss


def test_sampled_softmax_masks_same_user_and_positive_duplicates():
    # six items on the unit circle; two sequences: user A = [0, 1, 2], user B = [3, 4]
    angles = torch.tensor([0.0, 0.7, 1.9, 2.8, 4.0, 5.1], dtype=torch.float64)
    table = torch.stack([angles.cos(), angles.sin()], 1)
    embed = lambda rows: table[rows]  # noqa: E731
    seq_items, seq_offsets = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 3, 5])
    # trained positions: A predicts 1 from 0, 2 from 1; B predicts 4 from 3
    q = F.normalize(torch.tensor([[1.0, 0.2], [0.3, 1.0], [-0.8, -0.4]], dtype=torch.float64), dim=1)
    targets, owner = torch.tensor([1, 2, 4]), torch.tensor([0, 0, 1])
    negatives = torch.tensor([5, 0, 1, 5])  # 1 duplicates A's first positive; 0 is A's own item
    tau = 0.5
    loss = sampled_softmax_loss(q, targets, owner, seq_items, seq_offsets, negatives, embed, tau)

    # hand reference: candidates {0, 1, 2, 4, 5}; a user's own items other than its target are out
    allowed = [[1, 4, 5], [2, 4, 5], [0, 1, 2, 4, 5]]

    def reference(sets):
        terms = []
        for p, cands in enumerate(sets):
            logit = lambda c, p=p: float(q[p] @ table[c]) / tau  # noqa: E731
            lse = math.log(sum(math.exp(logit(c)) for c in cands))  # a listed duplicate counts twice
            terms.append(lse - logit(int(targets[p])))
        return sum(terms) / len(terms)

    assert loss.item() == pytest.approx(reference(allowed), rel=1e-12)
    # the masking matters here: without it (or with the duplicate 1 counted twice) the loss differs
    assert abs(loss.item() - reference([[0, 1, 2, 4, 5]] * 3)) > 1e-3
    assert abs(loss.item() - reference([[1, 1, 4, 5], [2, 4, 5], [0, 1, 2, 4, 5]])) > 1e-3
    # a random negative equal to an anchor's positive changes nothing (it *is* the positive column)
    same = sampled_softmax_loss(q, targets, owner, seq_items, seq_offsets, torch.tensor([5, 0]), embed, tau)
    assert same.item() == pytest.approx(loss.item(), rel=1e-12)


# ----------------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("encoder", ["hstu", "sasrec"])
def test_full_corpus_ranks_equal_brute_force(encoder):
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    num_items, lengths = 40, [3, 5, 9, 4, 12, 6, 3]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    items = rng.integers(0, num_items, offsets[-1])
    ts = np.sort(rng.integers(0, 10_000, offsets[-1]))
    split = leave_last_out(offsets, items, ts, max_len=5)
    model = SequenceRetriever(num_items, RetrievalConfig(encoder=encoder, dim=8, max_len=5)).double()
    model.train()  # evaluate_ranks must switch to eval mode itself (no dropout) and back
    for data in (split.valid, split.test):
        ranks = evaluate_ranks(model, data, chunk=3)
        assert model.training
        model.eval()
        with torch.no_grad():
            expected = [_brute_force_rank(model, data, u, num_items) for u in range(len(data))]
        model.train()
        assert ranks.tolist() == expected


def _brute_force_rank(model, data, u, num_items):
    one = data.history.rows(torch.tensor([u]))
    query = model(one.items, one.ts, one.offsets, data.target_ts[u : u + 1])[-1]  # asked at the target's time
    scores = [float(query @ F.normalize(model.item_table.weight[i], dim=0)) for i in range(num_items)]
    target = scores[int(data.targets[u])]
    return sum(s > target for s in scores)


def test_ranking_metrics():
    m = ranking_metrics(torch.tensor([0, 3, 10, 60]))
    assert m["hr@10"] == 0.5 and m["hr@50"] == 0.75
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5)) / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 4 + 1 / 11 + 1 / 61) / 4)


def test_eval_set_without_users_is_empty():
    empty = Sequences(
        *(torch.zeros(0, dtype=torch.int64) for _ in range(2)),
        torch.zeros(1, dtype=torch.int64),
        torch.zeros(0, dtype=torch.int64),
    )
    model = SequenceRetriever(5, RetrievalConfig(dim=4))
    assert evaluate_ranks(model, EvalSet(empty, torch.zeros(0, dtype=torch.int64))).numel() == 0


# ------------------------------------------------------------------------------ training, CLI


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    # one interest per user and a small affinity pool: a user's next items are predictable from the
    # earlier ones (popularity alone gets HR@10 ~0.2, a trained tower ~0.7)
    cfg = SynthConfig(
        num_users=200,
        num_items=300,
        history_length=(20, 60),
        requests_per_user=(1, 4),
        max_interests=1,
        candidate_pool=40,
        popular_share=0.1,
        seed=1,
    )
    return generate(cfg, tmp_path_factory.mktemp("retrieval") / "synth")


@pytest.mark.parametrize("encoder", ["hstu", "sasrec"])
def test_smoke_training_learns(synth, tmp_path, encoder):
    cfg = RetrievalConfig(
        encoder=encoder,
        dim=32,
        num_layers=1,
        max_len=40,
        dropout=0.0,
        epochs=6,
        batch_size=32,
        lr=3e-3,
        num_negatives=64,
    )
    report = train_retrieval(synth, cfg, log=lambda s: None, json_path=tmp_path / "r.json")
    random_hr10 = 10 / report.num_items
    assert report.num_users == 200 and report.steps == 6 * 7
    assert report.test["hr@10"] > 5 * random_hr10  # measured: ~0.65-0.7 vs 0.033
    assert report.test["hr@10"] > report.popular_test["hr@10"] + 0.1  # and popularity's ~0.18
    assert report.curve[-1]["loss"] < report.curve[0]["loss"]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["test"] == report.test and saved["config"]["encoder"] == encoder


def test_cli_retrieval_smoke(synth, tmp_path, capsys):
    out = tmp_path / "sasrec.json"
    argv = [
        "train",
        "--model",
        "sasrec",
        "--data",
        str(synth),
        "--max-steps",
        "2",
        "--dim",
        "16",
        "--max-len",
        "20",
        "--layers",
        "1",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "HR@10" in printed and "NDCG@50" in printed and "test" in printed
    report = json.loads(out.read_text())
    assert report["steps"] == 2 and set(report["test"]) >= {"hr@10", "ndcg@10", "hr@50", "ndcg@50"}
    assert report["config"]["max_len"] == 20 and report["config"]["num_layers"] == 1


def test_cli_retrieval_options_are_checked(synth, capsys):
    assert main(["train", "--data", str(synth), "--out", "x", "--max-len", "20"]) == 2
    assert "--max-len" in capsys.readouterr().err
    assert main(["train", "--data", str(synth)]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.skipif(not ML100K.is_dir(), reason="needs /work/shared/data/ml-100k")
def test_movielens_100k_split(tmp_path):
    from sterling.data.movielens import load_movielens

    timelines, num_items = load_timelines(load_movielens(ML100K, tmp_path / "ml-100k"))
    split = leave_last_out(timelines.offsets, timelines.item_rows, timelines.ts, max_len=200)
    assert num_items == 1682 and len(split.test) == len(split.valid) == 943  # every user has >= 20 ratings
    assert int(split.train.offsets[-1]) == sum(min(n - 2, 200) for n in np.diff(timelines.offsets))
    last = timelines.offsets[1:] - 1
    assert split.test.targets.tolist() == timelines.item_rows[last].tolist()
    assert split.valid.targets.tolist() == timelines.item_rows[last - 1].tolist()
