"""The ranker's trainer: micro-batches give the whole batch's gradient, and ROO and impression
training of the same model end at the same place."""

from __future__ import annotations

import math

import pytest
import torch
from tests.models.test_ranker import make_model, random_batch

from sterling.data.synth import SynthConfig, generate
from sterling.train.ranking import RankingConfig, accumulate_gradient, ranking_loss, train_ranker


@pytest.mark.parametrize("mode", ["roo", "impression"])
@pytest.mark.parametrize("micro_tokens", [1, 40, 10_000])
def test_micro_batches_give_the_whole_batch_gradient(mode: str, micro_tokens: int) -> None:
    batch = random_batch(torch.Generator().manual_seed(4), [5, 0, 9, 3], [2, 4, 1, 3])
    model = make_model("hstu").train()
    ranking_loss(model, batch, mode).backward()
    whole = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = accumulate_gradient(model, batch, mode, micro_tokens)
    assert math.isclose(loss, ranking_loss(model, batch, mode).item(), rel_tol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, whole[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(
        SynthConfig(
            num_users=40,
            num_items=300,
            requests_per_user=(2, 4),
            impressions_per_request=(3, 12),
            history_length=(10, 40),
            seed=2,
        ),
        tmp_path_factory.mktemp("rank"),
    )


def test_roo_and_impression_training_agree(data) -> None:
    cfg = RankingConfig(dim=16, num_layers=1, dropout=0.0, max_history=32, token_budget=512, max_impressions=600)
    roo = train_ranker(data, cfg, log=lambda s: None)
    imp = train_ranker(data, RankingConfig(**{**cfg.__dict__, "mode": "impression"}), log=lambda s: None)
    assert roo.impressions == imp.impressions >= 600 and roo.steps == imp.steps
    assert set(roo.ne) == {"click", "like", "share"}
    for task in roo.ne:
        for metric in ("ne", "auc", "gauc"):
            a, b = getattr(roo, metric)[task], getattr(imp, metric)[task]
            assert (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-3, (metric, task, a, b)
    assert roo.peak_rss_mb > 0 and roo.mean_history_len > 0 and roo.mean_impressions_per_request >= 3


def test_time_limit_and_mode_validation(data) -> None:
    report = train_ranker(
        data, RankingConfig(dim=8, num_layers=1, max_history=16, token_budget=256, max_seconds=0.0), log=lambda s: None
    )
    assert report.steps == 1
    with pytest.raises(ValueError, match="mode must be one of"):
        RankingConfig(mode="listwise")
