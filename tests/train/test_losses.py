"""The two-tower loss: its request shards add up to the whole batch's loss and gradients (what
data-parallel training relies on), and the masks and counts come from the whole batch."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.data.batch import ItemCatalog, RequestReader
from sterling.data.items import read_items
from sterling.data.schema import read_roles
from sterling.data.synth import SynthConfig, generate
from sterling.models.towers import ItemTerms, TwoTower, TwoTowerConfig
from sterling.train.distributed import shard_bounds
from sterling.train.losses import two_tower_loss


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = generate(
        SynthConfig(num_users=30, num_items=300, requests_per_user=(1, 5), history_length=(0, 30), seed=4),
        tmp_path_factory.mktemp("synth"),
    )
    item_ids, attributes, _ = read_items(data / "items.parquet")
    catalog, terms = ItemCatalog(item_ids), ItemTerms.build(attributes)
    roles = read_roles(pq.read_schema(data / "requests.parquet"))
    cfg = TwoTowerConfig(
        num_items=len(catalog),
        num_terms=len(terms.vocab),
        tasks=tuple(roles.labels),
        context_features=tuple(roles.context),
        user_features=tuple(roles.user),
        dim=16,
        hidden=32,
        max_history=20,
    )
    batches = list(RequestReader(data, catalog, max_history=20, token_budget=600).batches())
    frequency = torch.rand(len(catalog)) + 0.1
    return TwoTower(cfg), terms, batches, frequency / frequency.sum()


def _loss_and_grads(model, terms, batch, frequency, shard):
    model.zero_grad(set_to_none=True)
    loss = two_tower_loss(model, batch, terms, 64, frequency, torch.Generator().manual_seed(7), shard)
    loss.total.backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    return loss, grads


@settings(max_examples=12, deadline=None)
@given(which=st.integers(0, 1000), world=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_shards_add_up_to_the_batch(setup, which, world, seed):
    model, terms, batches, frequency = setup
    batch = batches[which % len(batches)]
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(0, batch.num_requests + 1, world - 1))
    bounds = list(zip(np.r_[0, cuts], np.r_[cuts, batch.num_requests]))
    whole, whole_grads = _loss_and_grads(model, terms, batch, frequency, None)
    total, grads = torch.zeros(()), {n: torch.zeros_like(g) for n, g in whole_grads.items()}
    for lo, hi in bounds:
        part, part_grads = _loss_and_grads(model, terms, batch, frequency, (int(lo), int(hi)))
        assert part.positives == whole.positives
        total = total + part.total.detach()
        for n, g in part_grads.items():
            grads[n] += g
    torch.testing.assert_close(total, whole.total.detach(), rtol=1e-5, atol=1e-6)
    for n, g in grads.items():
        torch.testing.assert_close(g, whole_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_the_mask_spans_the_batch(setup):
    """A user's positive in one shard is not a negative for the same user's request in another."""
    model, terms, batches, frequency = setup
    batch = next(b for b in batches if b.num_requests > 2 and len(set(b.user_ids.tolist())) < b.num_requests)
    users = batch.user_ids.tolist()
    r = next(i for i in range(1, batch.num_requests) if users[i] in users[:i])
    parts = [
        two_tower_loss(model, batch, terms, 64, frequency, torch.Generator().manual_seed(7), s).total
        for s in ((0, r), (r, batch.num_requests))
    ]
    whole = two_tower_loss(model, batch, terms, 64, frequency, torch.Generator().manual_seed(7)).total
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "tokens, world", [([5, 5, 5, 5], 2), ([1, 100, 1], 2), ([3], 3), ([2, 2, 2, 2, 2], 3), ([], 2)]
)
def test_shard_bounds_cover_the_batch_once(tokens, world):
    bounds = [shard_bounds(np.array(tokens, dtype=np.int64), r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == len(tokens)
    assert all(a[1] == b[0] and a[0] <= a[1] for a, b in zip(bounds, bounds[1:]))
    if len(tokens) >= world and max(tokens) * world <= sum(tokens):
        assert all(hi > lo for lo, hi in bounds)
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        shard_bounds(np.array(tokens, dtype=np.int64), 2, 2)
