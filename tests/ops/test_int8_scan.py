"""int8_scan: reference against brute force, the CPU kernel against the reference, masks,
padding, rescoring and validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.index.ivf import IVFLayout
from sterling.index.quant import dequantize, quantize, quantize_queries
from sterling.ops.int8_scan import Kernel, int8_scan, probed_rows

KERNELS = [Kernel.REFERENCE, Kernel.CPU]


def exact_scores(qc, qs, codes, scales) -> torch.Tensor:
    """float32 [B, N], computed as the contract states: (dot * item scale) * query scale."""
    dots = (qc.long() @ codes.long().T).float()
    item = scales if scales.shape[0] == codes.shape[0] else scales.expand(codes.shape[0])
    return (dots * item) * qs[:, None]


@st.composite
def problems(draw: st.DrawFn):
    b, d = draw(st.integers(1, 6)), draw(st.integers(1, 9))
    nlist = draw(st.integers(1, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    sizes = torch.randint(0, draw(st.sampled_from([1, 5, 40])), (nlist,), generator=gen)
    offsets = torch.zeros(nlist + 1, dtype=torch.int64)
    torch.cumsum(sizes, 0, out=offsets[1:])
    n = int(offsets[-1])
    span = draw(st.sampled_from([2, 127]))  # small codes: many exact ties
    codes = torch.randint(-span, span + 1, (n, d), generator=gen).to(torch.int8)
    qc = torch.randint(-span, span + 1, (b, d), generator=gen).to(torch.int8)
    scales = (
        torch.rand(n, generator=gen) + 0.1 if draw(st.booleans()) else torch.tensor([0.5])
    ).float()
    qs = (torch.rand(b, generator=gen) + 0.1).float()
    p = draw(st.integers(1, nlist))
    probes = torch.stack([torch.randperm(nlist, generator=gen)[:p] for _ in range(b)])
    if draw(st.booleans()):  # unused probe slots
        probes = probes.masked_fill(torch.rand(b, p, generator=gen) < 0.3, -1)
    form = draw(st.sampled_from([None, "shared", "per_query", "partial"]))
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    full = torch.rand(b, n, generator=gen) < density
    if form is None:
        mask = None
    elif form == "shared":
        full = full[:1].expand(b, n)
        mask = full[0].clone()
    elif form == "per_query":
        mask = full
    else:
        width = int(sizes.max()) + draw(st.integers(0, 3))
        rows = probed_rows(offsets, probes, width)
        mask = rows >= 0
        if n:
            mask &= full.gather(1, rows.clamp(min=0).flatten(1)).view_as(rows)
    k = draw(st.integers(1, 30))
    return (qc, qs, codes, scales, offsets, probes, k, mask), (full if form else None)


def check(args, full, scores, rows) -> None:
    """Right count, distinct rows inside the probed clusters and passing, exact scores,
    descending, and no passing probed row left out that beats the last one returned."""
    qc, qs, codes, scales, offsets, probes, k, _ = args
    b, n = qc.shape[0], codes.shape[0]
    exact = exact_scores(qc, qs, codes, scales)
    labels = torch.repeat_interleave(torch.arange(len(offsets) - 1), offsets.diff())
    assert scores.shape == (b, k) and rows.shape == (b, k) and rows.dtype == torch.int64
    for i in range(b):
        eligible = torch.isin(labels, probes[i][probes[i] >= 0])
        if full is not None:
            eligible &= full[i]
        count = min(k, int(eligible.sum()))
        got = rows[i, :count]
        assert (rows[i, count:] == -1).all() and torch.isneginf(scores[i, count:]).all()
        assert (got >= 0).all() and len(set(got.tolist())) == count
        assert eligible[got].all()
        assert torch.equal(scores[i, :count], exact[i, got])
        assert (scores[i, :count].diff() <= 0).all()
        left = eligible.clone()
        left[got] = False
        if count and left.any():
            assert exact[i, left].max() <= exact[i, got].min()


@settings(max_examples=150, deadline=None)
@given(problems())
def test_kernels_against_brute_force(problem) -> None:
    args, full = problem
    ref = int8_scan(*args, kernel=Kernel.REFERENCE)
    fast = int8_scan(*args, kernel=Kernel.CPU)
    check(args, full, *ref)
    check(args, full, *fast)
    assert torch.equal(ref[0], fast[0])  # same scores, bit for bit (rows may differ on ties)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("per_item", [True, False])
def test_ivf_full_probe_with_rescore_is_exact(kernel: Kernel, per_item: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x, queries = torch.randn(600, 12, generator=gen), torch.randn(7, 12, generator=gen)
    layout = IVFLayout.build(x, 9, seed=0)
    xs = x[layout.order]
    items, q = quantize(xs, per_item=per_item), quantize_queries(queries)
    probes = layout.probe(queries, 9)
    scores, rows = int8_scan(q.codes, q.scales, items.codes, items.scales, layout.list_offsets,
                             probes, 20, kernel=kernel)
    deq = dequantize(q) @ dequantize(items).T
    torch.testing.assert_close(scores, deq.topk(20, dim=1).values, rtol=1e-5, atol=1e-5)
    scores, rows = int8_scan(q.codes, q.scales, items.codes, items.scales, layout.list_offsets,
                             probes, 20, rescore=(queries, xs), rescore_k=600, kernel=kernel)
    exact = (queries @ xs.T).topk(20, dim=1)
    torch.testing.assert_close(scores, exact.values)
    assert torch.equal(layout.order[rows], layout.order[exact.indices])


@pytest.mark.parametrize("kernel", KERNELS)
def test_mask_and_padding(kernel: Kernel) -> None:
    codes = torch.arange(10, dtype=torch.int8)[:, None]
    offsets = torch.tensor([0, 4, 10])
    qc, qs, scales = torch.ones(2, 1, dtype=torch.int8), torch.ones(2), torch.ones(1)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[1, 5, 9]] = True
    probes = torch.tensor([[0, 1], [1, -1]])
    scores, rows = int8_scan(qc, qs, codes, scales, offsets, probes, 4, mask, kernel=kernel)
    assert rows.tolist() == [[9, 5, 1, -1], [9, 5, -1, -1]]
    assert scores[0, :3].tolist() == [9.0, 5.0, 1.0] and torch.isneginf(scores[:, 3]).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_rescore_reranks_the_int8_candidates(kernel: Kernel) -> None:
    gen = torch.Generator().manual_seed(1)
    xs, queries = torch.randn(300, 8, generator=gen), torch.randn(4, 8, generator=gen)
    items, q = quantize(xs), quantize_queries(queries)
    offsets = torch.tensor([0, 100, 300])
    probes = torch.tensor([[0, 1]] * 4)
    _, cand = int8_scan(q.codes, q.scales, items.codes, items.scales, offsets, probes, 30,
                        kernel=kernel)
    scores, rows = int8_scan(q.codes, q.scales, items.codes, items.scales, offsets, probes, 10,
                             rescore=(queries, xs), rescore_k=30, kernel=kernel)
    for i in range(4):
        assert set(rows[i].tolist()) <= set(cand[i].tolist())
        best = (queries[i] @ xs[cand[i]].T).topk(10).values
        torch.testing.assert_close(scores[i], best)


def test_validation() -> None:
    qc, qs = torch.zeros(2, 3, dtype=torch.int8), torch.ones(2)
    codes, scales = torch.zeros(5, 3, dtype=torch.int8), torch.ones(5)
    offsets = torch.tensor([0, 2, 5])
    ok = torch.tensor([[0, 1], [1, -1]])
    int8_scan(qc, qs, codes, scales, offsets, ok, 3)
    cases = [
        dict(probes=torch.tensor([[0, 0], [1, -1]])),  # repeated cluster
        dict(probes=torch.tensor([[0, 2], [1, -1]])),  # out of range
        dict(mask=torch.ones(4, dtype=torch.bool)),
        dict(mask=torch.ones(2, 2, 2, dtype=torch.bool)),  # L shorter than the longest cluster
        dict(k=0),
        dict(scales=torch.ones(4)),
        dict(offsets=torch.tensor([0, 2, 4])),
        dict(rescore_k=5),  # without rescore
        dict(rescore=(torch.zeros(2, 3), torch.zeros(5, 3)), rescore_k=2),  # < k
    ]
    for case in cases:
        kw = dict(probes=ok, mask=None, k=3, scales=scales, offsets=offsets)
        kw.update(case)
        extra = {key: kw.pop(key) for key in ("rescore", "rescore_k") if key in kw}
        with pytest.raises(ValueError):
            int8_scan(qc, qs, codes, kw["scales"], kw["offsets"], kw["probes"], kw["k"],
                      kw["mask"], **extra)
