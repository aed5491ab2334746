"""The sequential ranker: ROO and impression modes agree (predictions, loss, gradients), and no
candidate sees labels, other candidates or the future."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.data.batch import ItemCatalog, RequestBatch, RequestReader
from sterling.data.items import read_items
from sterling.data.synth import SynthConfig, generate
from sterling.models.ranker import RankerConfig, SequenceRanker

NUM_ITEMS, TASKS = 40, ("click", "like")


def random_batch(gen: torch.Generator, history_lengths: list[int], impressions: list[int]) -> RequestBatch:
    """A batch of ``len(history_lengths)`` requests with random items, actions and timestamps."""
    r = len(history_lengths)
    h = torch.tensor(history_lengths)
    k = torch.tensor(impressions)
    h_off = torch.cat([torch.zeros(1, dtype=torch.int64), h.cumsum(0)])
    k_off = torch.cat([torch.zeros(1, dtype=torch.int64), k.cumsum(0)])
    ts = 10_000 + torch.randint(0, 100_000, (r,), generator=gen)
    owner = torch.repeat_interleave(torch.arange(r), h)
    history_ts = ts[owner] - torch.randint(1, 5_000, (int(h.sum()),), generator=gen)
    return RequestBatch(
        request_ids=torch.arange(r),
        user_ids=torch.arange(r),
        ts=ts,
        context={},
        user_features={},
        history_items=torch.randint(0, NUM_ITEMS, (int(h.sum()),), generator=gen),
        history_actions=torch.randint(0, 8, (int(h.sum()),), generator=gen),
        history_ts=history_ts,
        history_offsets=h_off,
        item_rows=torch.randint(0, NUM_ITEMS, (int(k.sum()),), generator=gen),
        positions=torch.cat([torch.arange(n) for n in impressions]),
        labels=(torch.rand(int(k.sum()), len(TASKS), generator=gen) < 0.3).float(),
        impression_features={},
        impression_offsets=k_off,
    )


def make_model(encoder: str, dropout: float = 0.0, layers: int = 2) -> SequenceRanker:
    torch.manual_seed(0)
    return SequenceRanker(
        RankerConfig(
            num_items=NUM_ITEMS,
            tasks=TASKS,
            encoder=encoder,
            dim=16,
            num_layers=layers,
            num_heads=2,
            norm_len=64,
            dropout=dropout,
        )
    )


def per_impression_loss(model: SequenceRanker, batch: RequestBatch, mode: str) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(model(batch, mode), batch.labels)


requests = st.lists(st.tuples(st.integers(0, 12), st.integers(1, 6)), min_size=1, max_size=5)


@pytest.mark.parametrize("encoder", ["hstu", "sasrec"])
@settings(max_examples=25, deadline=None)
@given(shape=requests, seed=st.integers(0, 2**16))
def test_roo_equals_impression_mode(encoder: str, shape: list[tuple[int, int]], seed: int) -> None:
    batch = random_batch(torch.Generator().manual_seed(seed), [h for h, _ in shape], [k for _, k in shape])
    model = make_model(encoder).train()  # dropout 0: train mode, identical in both layouts
    roo, imp = model(batch, "roo"), model(batch, "impression")
    assert roo.shape == (batch.num_impressions, len(TASKS))
    torch.testing.assert_close(roo, imp, rtol=1e-5, atol=1e-5)
    grads = []
    for mode in ("roo", "impression"):
        model.zero_grad()
        per_impression_loss(model, batch, mode).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(model.parameters()))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("encoder", ["hstu", "sasrec"])
@settings(max_examples=20, deadline=None)
@given(shape=requests, seed=st.integers(0, 2**16), chunk=st.integers(1, 4))
def test_the_served_stage_scores_as_the_trained_forward(encoder: str, shape, seed: int, chunk: int) -> None:
    """score_candidates over given embeddings (HSTU: M-FALCON in chunks) equals forward in roo mode."""
    batch = random_batch(torch.Generator().manual_seed(seed), [h for h, _ in shape], [k for _, k in shape])
    model = make_model(encoder).eval()
    with torch.no_grad():
        want = model(batch, "roo")
        got = model.score_candidates(
            model.items(batch.history_items),
            batch.history_actions,
            batch.history_offsets,
            batch.history_ts,
            model.items(batch.item_rows),
            batch.impression_offsets,
            batch.ts[batch.impression_to_request()],
            positions=batch.positions,
            chunk=chunk,
        )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("encoder", ["hstu", "sasrec"])
def test_a_request_scores_the_same_alone_and_in_a_batch(encoder: str) -> None:
    gen = torch.Generator().manual_seed(1)
    batch = random_batch(gen, [7, 0, 12], [3, 2, 5])
    model = make_model(encoder).eval()
    together = model(batch)
    alone = random_batch(gen, [12], [5])
    alone = RequestBatch(
        **{
            **batch.__dict__,
            "request_ids": batch.request_ids[2:],
            "user_ids": batch.user_ids[2:],
            "ts": batch.ts[2:],
            "history_items": batch.history_items[7:],
            "history_actions": batch.history_actions[7:],
            "history_ts": batch.history_ts[7:],
            "history_offsets": torch.tensor([0, 12]),
            "item_rows": batch.item_rows[5:],
            "positions": batch.positions[5:],
            "labels": batch.labels[5:],
            "impression_offsets": torch.tensor([0, 5]),
        }
    )
    torch.testing.assert_close(model(alone), together[5:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("encoder", ["hstu", "sasrec"])
def test_candidates_see_no_labels_and_no_other_candidate(encoder: str) -> None:
    batch = random_batch(torch.Generator().manual_seed(2), [9, 4], [6, 3])
    model = make_model(encoder).eval()
    before = model(batch)
    flipped = RequestBatch(**{**batch.__dict__, "labels": 1 - batch.labels})
    torch.testing.assert_close(model(flipped), before, rtol=0, atol=0)
    others = batch.item_rows.clone()
    others[1:6] = (others[1:6] + 7) % NUM_ITEMS  # every candidate of request 0 but the first
    changed = model(RequestBatch(**{**batch.__dict__, "item_rows": others}))
    torch.testing.assert_close(changed[0], before[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(changed[6:], before[6:], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(changed[1:6], before[1:6])  # the changed candidates' own scores move
    history = batch.history_items.clone()
    history[0] = (history[0] + 1) % NUM_ITEMS
    moved = model(RequestBatch(**{**batch.__dict__, "history_items": history}))
    assert not torch.allclose(moved[:6], before[:6]) and torch.allclose(moved[6:], before[6:])


def test_events_at_or_after_the_request_never_enter(tmp_path) -> None:
    data = generate(SynthConfig(num_users=12, num_items=150, seed=5), tmp_path / "data")
    ids, _, _ = read_items(data / "items.parquet")
    catalog = ItemCatalog(ids)
    model = SequenceRanker(RankerConfig(num_items=len(catalog), tasks=TASKS, dim=16, num_layers=1, norm_len=512)).eval()
    before = [model(b) for b in RequestReader(data, catalog, max_history=400).batches()]
    users = pq.read_table(data / "users.parquet")
    rows = users.to_pylist()
    for row in rows:  # the future: events at the latest request time and after, on popular items
        last = max(pq.read_table(data / "requests.parquet", columns=["ts"]).column("ts").to_pylist())
        row["timeline_item_id"] += [int(ids[0]), int(ids[1])]
        row["timeline_action"] += [7, 7]
        row["timeline_ts"] += [last, last + 60]
    pq.write_table(pa.Table.from_pylist(rows, schema=users.schema), data / "users.parquet")
    after = [model(b) for b in RequestReader(data, catalog, max_history=400).batches()]
    assert len(after) == len(before)
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_config_and_mode_validation() -> None:
    with pytest.raises(ValueError, match="encoder must be 'hstu' or 'sasrec', got 'rnn'"):
        RankerConfig(num_items=3, tasks=("a",), encoder="rnn")
    with pytest.raises(ValueError, match="at least one task"):
        RankerConfig(num_items=3, tasks=())
    batch = random_batch(torch.Generator().manual_seed(0), [2], [1])
    with pytest.raises(ValueError, match="mode must be one of"):
        make_model("hstu")(batch, mode="pairwise")
