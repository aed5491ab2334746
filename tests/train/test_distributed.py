"""Data-parallel training over gloo on 127.0.0.1 (sterling.train.distributed): a DDP step on two
ranks leaves the single-process gradient of the whole batch, and ``train --nproc 2`` ends with the
parameters of single-process training on the same batches."""

import dataclasses

import pyarrow.parquet as pq
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from sterling.data.batch import ItemCatalog, RequestReader
from sterling.data.items import read_items
from sterling.data.schema import read_roles
from sterling.data.synth import SynthConfig, generate
from sterling.models.towers import ItemTerms, TwoTower, TwoTowerConfig
from sterling.snapshot import read_snapshot
from sterling.train.distributed import run_ranks
from sterling.train.loop import TrainConfig, backward_step, train, train_distributed
from sterling.train.losses import TwoTowerObjective

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="torch.distributed with gloo is not available",
    ),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    config = SynthConfig(num_users=40, num_items=300, requests_per_user=(2, 5), history_length=(5, 40), seed=5)
    return generate(config, tmp_path_factory.mktemp("data"))


def batch_gradients(data, distributed: bool) -> dict[str, torch.Tensor]:
    """The parameters' gradients after one backward_step on each of the first three batches."""
    item_ids, attributes, _ = read_items(data / "items.parquet")
    catalog, terms = ItemCatalog(item_ids), ItemTerms.build(attributes)
    roles = read_roles(pq.read_schema(data / "requests.parquet"))
    torch.manual_seed(0)
    model = TwoTower(
        TwoTowerConfig(
            num_items=len(catalog),
            num_terms=len(terms.vocab),
            tasks=tuple(roles.labels),
            context_features=tuple(roles.context),
            user_features=tuple(roles.user),
            dim=16,
            hidden=32,
            max_history=20,
        )
    )
    objective = TwoTowerObjective(model)
    if distributed:
        objective = DistributedDataParallel(objective)
    frequency = torch.full((len(catalog),), 1.0 / len(catalog))
    gen = torch.Generator().manual_seed(3)
    batches = RequestReader(data, catalog, max_history=20, token_budget=700).batches()
    for _, batch in zip(range(3), batches):
        backward_step(objective, batch, terms, 64, frequency, gen)  # gradients accumulate over the batches
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_ddp_step_leaves_the_whole_batch_gradient(data):
    one = batch_gradients(data, distributed=False)
    two = run_ranks(batch_gradients, (data, True), nproc=2)
    assert one.keys() == two.keys() and len(one) > 5
    for name, grad in one.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(two[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_two_processes_train_like_one(data, tmp_path):
    cfg = TrainConfig(epochs=1, max_steps=4, dim=16, hidden=32, token_budget=800, num_negatives=64, overarch=None)
    one = train(data, tmp_path / "one", cfg, log=lambda s: None)
    two = train_distributed(data, tmp_path / "two", cfg, nproc=2, log=print)
    assert (
        one.steps == two.steps == 4 and two.checkpoint == tmp_path / "two" and two.metrics.keys() == one.metrics.keys()
    )
    start = train(data, tmp_path / "start", dataclasses.replace(cfg, max_steps=1, lr=0.0), log=lambda s: None)
    a, b, s = (read_snapshot(r.checkpoint).tensors["model"] for r in (one, two, start))
    assert a.keys() == b.keys()
    assert sum(not torch.equal(a[n], s[n]) for n in a) > len(a) // 2  # the steps moved most parameters...
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)  # ...alike in both runs
