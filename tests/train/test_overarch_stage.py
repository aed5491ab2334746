"""OverArch training (stage 2): the losses against plain loops, the candidates (impressions plus
uniformly drawn retrieved negatives that were not impressed), and a short run on a tiny synthetic
dataset that lowers the loss."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sterling.data.batch import ItemCatalog, RequestReader
from sterling.data.items import read_items
from sterling.data.schema import DatasetPaths
from sterling.data.synth import SynthConfig, generate
from sterling.models.overarch import MLPOverArch, MoLOverArch
from sterling.models.towers import ItemTerms
from sterling.train.checkpoint import load_checkpoint
from sterling.train.encode import encode_catalog
from sterling.train.loop import TrainConfig, train
from sterling.train.overarch import (
    OverArchTrainConfig,
    _candidates,
    cached_embeddings,
    listwise_loss,
    overarch_inputs,
    overarch_loss,
    train_overarch,
)
from sterling.train.split import holdout_requests

# ---- the losses ------------------------------------------------------------------------------


def plain_listwise(logits, labels, valid, impressions):
    """Mean over every (request, candidate, task) positive of -log softmax of its logit among
    itself and its request's valid retrieved candidates (columns >= impressions) that are not
    positive on that task."""
    losses = []
    r_, m_, t_ = logits.shape
    for r in range(r_):
        for t in range(t_):
            for m in range(m_):
                if not (bool(valid[r, m]) and float(labels[r, m, t]) > 0):
                    continue
                others = [
                    j for j in range(impressions, m_) if j != m and bool(valid[r, j]) and not float(labels[r, j, t]) > 0
                ]
                row = torch.stack([logits[r, m, t]] + [logits[r, j, t] for j in others])
                losses.append(torch.logsumexp(row, 0) - row[0])
    return torch.stack(losses).mean() if losses else torch.zeros(())


@st.composite
def loss_inputs(draw):
    r, t = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    impressions, negatives = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    m = impressions + negatives
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = torch.randn(r, m, t, generator=gen) * draw(st.sampled_from([0.1, 1.0, 10.0]))
    labels = (torch.rand(r, m, t, generator=gen) < draw(st.sampled_from([0.0, 0.2, 0.5, 1.0]))).float()
    if draw(st.booleans()):
        labels[:, impressions:] = 0.0  # as in training: retrieved negatives carry no label
    if r > 1:
        labels[0] = 0.0  # a request without positives
    valid = torch.rand(r, m, generator=gen) < draw(st.sampled_from([0.5, 0.9, 1.0]))
    return logits, labels, valid, impressions


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=loss_inputs())
def test_listwise_loss_equals_a_plain_loop(case):
    logits, labels, valid, impressions = case
    got = listwise_loss(logits, labels, valid, impressions)
    assert got.shape == ()
    torch.testing.assert_close(got, plain_listwise(logits, labels, valid, impressions), rtol=1e-5, atol=1e-5)
    assert got >= 0


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=loss_inputs())
def test_overarch_loss_is_bce_plus_listwise(case):
    logits, labels, valid, impressions = case
    if not valid.any():
        return  # BCE over no candidates is undefined
    r, m, t = logits.shape
    terms = [
        F.binary_cross_entropy_with_logits(logits[i, j, k], labels[i, j, k])
        for i in range(r)
        for j in range(m)
        for k in range(t)
        if valid[i, j]
    ]
    bce = torch.stack(terms).mean()
    want = bce + plain_listwise(logits, labels, valid, impressions)
    torch.testing.assert_close(overarch_loss(logits, labels, valid, impressions), want, rtol=1e-5, atol=1e-5)


def test_listwise_gradient_reaches_positives_and_retrieved_negatives_only():
    gen = torch.Generator().manual_seed(0)
    r, m, t, imp = 3, 8, 2, 4
    logits = torch.randn(r, m, t, generator=gen, requires_grad=True)
    labels = torch.zeros(r, m, t)
    labels[0, 1, 0] = labels[1, 0, 1] = labels[1, 2, 1] = 1.0
    valid = torch.ones(r, m, dtype=torch.bool)
    valid[0, 6] = False
    listwise_loss(logits, labels, valid, imp).backward()
    g = logits.grad
    touched = g != 0
    assert not touched[2].any()  # no positives in request 2
    assert not touched[:, :, 0][1].any() and not touched[:, :, 1][0].any()
    assert touched[0, 1, 0] and touched[1, 0, 1] and touched[1, 2, 1]
    assert not touched[0, [0, 2, 3], 0].any()  # unengaged impressions are left out
    assert touched[0, [4, 5, 7], 0].all() and not touched[0, 6, 0]  # valid retrieved negatives only
    assert touched[1, 4:, 1].all() and not touched[1, [1, 3], 1].any()
    # the positive is pushed up, the negatives down
    assert g[0, 1, 0] < 0 and (g[0, [4, 5, 7], 0] > 0).all()


def test_no_positive_anywhere_gives_zero():
    logits = torch.randn(2, 5, 3)
    assert listwise_loss(logits, torch.zeros(2, 5, 3), torch.ones(2, 5, dtype=torch.bool), 2) == 0


def test_cached_embeddings_round_like_the_serving_cache():
    x = torch.randn(10, 4)
    assert torch.equal(cached_embeddings(x, "float16"), x.half().float())
    assert torch.equal(cached_embeddings(x, "bfloat16"), x.bfloat16().float())
    assert cached_embeddings(x, "float16").dtype == torch.float32
    for bad in ("float32", "fp16", "int8"):
        with pytest.raises(ValueError, match="cache dtype"):
            cached_embeddings(x, bad)


# ---- on a tiny synthetic dataset ---------------------------------------------------------------


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """Frozen towers trained a few steps (no OverArch), the catalogue's vectors, a reader of small
    batches and the held-out requests."""
    root = tmp_path_factory.mktemp("overarch")
    data = generate(replace(SynthConfig(), num_users=200, num_items=600, seed=2), root / "data")
    report = train(
        data, root / "ckpt", TrainConfig(epochs=1, max_steps=8, dim=16, hidden=32, overarch=None), log=lambda s: None
    )
    ckpt = load_checkpoint(report.checkpoint)
    assert ckpt.overarch is None
    item_ids, attributes, _ = read_items(data / "items.parquet")
    vectors = encode_catalog(ckpt.model, ItemTerms.build(attributes, vocab=ckpt.term_vocab), len(item_ids))
    reader = RequestReader(data, ItemCatalog(item_ids), ckpt.model.cfg.max_history, token_budget=3000)
    holdout = holdout_requests(DatasetPaths(data).requests)
    return ckpt.model, reader, vectors, holdout


def test_overarch_inputs_read_the_cached_embeddings(stage):
    model, reader, vectors, holdout = stage
    items = cached_embeddings(vectors, "float16")
    batch = next(reader.batches(exclude=holdout))
    with torch.no_grad():
        users, queries, history, mask = overarch_inputs(model, batch, items)
    r = batch.num_requests
    lengths = batch.history_offsets[1:] - batch.history_offsets[:-1]
    assert users.shape == (r, 16) and queries.shape == (r, len(model.cfg.tasks), 16)
    assert history.shape == (r, int(lengths.max()), 16) and torch.equal(mask.sum(1), lengths)
    for i in (0, r // 2, r - 1):
        rows = batch.history_items[batch.history_offsets[i] : batch.history_offsets[i + 1]]
        assert torch.equal(history[i][mask[i]], items[rows]) and (history[i][~mask[i]] == 0).all()


def test_candidates_are_impressions_then_unimpressed_retrieved_items(stage):
    model, reader, vectors, holdout = stage
    items = cached_embeddings(vectors, "float16")
    batch = next(reader.batches(exclude=holdout))
    with torch.no_grad():
        _, queries, _, _ = overarch_inputs(model, batch, items)
    r, n = batch.num_requests, items.shape[0]
    k = int((batch.impression_offsets[1:] - batch.impression_offsets[:-1]).max())
    for primary in (0, 2):
        for pool in (10, n):
            negatives = 300
            gen = torch.Generator().manual_seed(pool + primary)
            rows, labels, valid = _candidates(batch, queries, items, negatives, pool, primary, gen)
            assert rows.shape == (r, k + negatives) and labels.shape == (r, k + negatives, 3)
            assert (labels[:, k:] == 0).all()
            for i in range(r):
                lo, hi = int(batch.impression_offsets[i]), int(batch.impression_offsets[i + 1])
                impressed = set(batch.item_rows[lo:hi].tolist())
                assert rows[i, : hi - lo].tolist() == batch.item_rows[lo:hi].tolist()
                assert valid[i, : hi - lo].all() and not valid[i, hi - lo : k].any()
                assert torch.equal(labels[i, : hi - lo], batch.labels[lo:hi])
                negs, ok = rows[i, k:], valid[i, k:]
                assert not impressed & set(negs[ok].tolist())  # impressed items are never negatives
                assert set(negs[~ok].tolist()) <= impressed  # invalid draws fell on impressed slots
                scores = queries[i, primary] @ items.T
                scores[list(impressed)] = float("-inf")
                top = set(torch.topk(scores, min(pool, n)).indices.tolist())
                top_unimpressed = {j for j in top if j not in impressed}
                assert set(negs[ok].tolist()) <= top_unimpressed  # from the request's top pool
                if pool == 10:  # uniform over the pool: 300 draws from 10 items cover all of them
                    assert set(negs[ok].tolist()) == top_unimpressed
                if pool == n:
                    assert len(set(negs[ok].tolist())) > 100  # not only the very top items


def _loss_on(arch, model, batches, items, cfg, primary=0):
    """Mean overarch_loss of ``arch`` over fixed batches with fixed candidates."""
    gen = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        for batch in batches:
            users, queries, history, mask = overarch_inputs(model, batch, items)
            rows, labels, valid = _candidates(
                batch, queries, items, cfg.retrieved_negatives, cfg.negative_pool, primary, gen
            )
            logits = arch(users, queries, history, mask, arch.item_state(items[rows]))
            total += float(overarch_loss(logits, labels, valid, rows.shape[1] - cfg.retrieved_negatives))
    return total / len(batches)


@pytest.mark.parametrize("kind", ["mol", "mlp"])
def test_train_overarch_lowers_the_loss(stage, kind):
    model, reader, vectors, holdout = stage
    steps = 25
    cfg = OverArchTrainConfig(
        kind=kind,
        epochs=3,
        lr=5e-3,
        retrieved_negatives=16,
        negative_pool=100,
        hidden=32,
        components=3,
        component_dim=8,
        max_steps=steps,
        seed=1,
    )
    lines = []
    before = train_overarch(model, reader, vectors, holdout, replace(cfg, lr=0.0, max_steps=1), log=lines.append)
    after = train_overarch(model, reader, vectors, holdout, cfg, log=lines.append)
    assert isinstance(after, MoLOverArch if kind == "mol" else MLPOverArch)
    assert not after.training and not before.training
    assert after.cfg.kind == kind and after.cfg.dim == 16 and after.cfg.num_tasks == 3
    assert after.cfg.hidden == 32 and (kind == "mlp" or (after.cfg.components, after.cfg.component_dim) == (3, 8))
    assert f"{steps} steps" in lines[-1] and "1 steps" in lines[0]
    # the same seed gives the same initial parameters; training moved them
    init = {k: v.clone() for k, v in before.state_dict().items()}
    assert any(not torch.equal(v, after.state_dict()[k]) for k, v in init.items())
    assert not any(p.requires_grad and p.grad is not None for p in model.parameters())  # towers frozen
    items = cached_embeddings(vectors, cfg.cache_dtype)
    batches = [b for _, b in zip(range(steps), reader.batches(exclude=holdout))]
    loss_before, loss_after = _loss_on(before, model, batches, items, cfg), _loss_on(after, model, batches, items, cfg)
    assert loss_after < 0.9 * loss_before, (loss_before, loss_after)
    # train_overarch never trains on held-out requests
    held = set(holdout.tolist())
    assert not any(held & set(b.request_ids.tolist()) for b in batches)


def test_train_overarch_is_deterministic(stage):
    model, reader, vectors, holdout = stage
    cfg = OverArchTrainConfig(
        kind="mol",
        epochs=1,
        retrieved_negatives=8,
        negative_pool=50,
        hidden=16,
        components=2,
        component_dim=4,
        max_steps=3,
        seed=7,
    )
    a = train_overarch(model, reader, vectors, holdout, cfg, log=lambda s: None)
    b = train_overarch(model, reader, vectors, holdout, cfg, log=lambda s: None)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
