import itertools
import math
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.classification import BinaryAUROC
from torchmetrics.retrieval import RetrievalAUROC, RetrievalHitRate, RetrievalNormalizedDCG

from sterling.train.metrics import auc, gauc, hit_rate, ndcg, ne, recall_at_k, target_ranks


def pairwise_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-5, 5), st.booleans()), min_size=2, max_size=40))
def test_auc_equals_pairwise_definition(pairs):
    scores = torch.tensor([float(s) for s, _ in pairs])
    labels = torch.tensor([int(y) for _, y in pairs])
    if labels.min() == labels.max():
        assert auc(scores, labels) != auc(scores, labels)  # NaN for one class
        return
    assert abs(auc(scores, labels) - pairwise_auc(scores.tolist(), labels.tolist())) < 1e-12


def test_auc_perfect_and_reversed():
    s = torch.tensor([0.1, 0.2, 0.8, 0.9])
    y = torch.tensor([0, 0, 1, 1])
    assert auc(s, y) == 1.0
    assert auc(-s, y) == 0.0


def test_recall_at_k():
    retrieved = torch.tensor([[1, 2, 3], [4, 5, -1], [7, 8, 9]])
    relevant = [{2, 10}, {6}, set()]
    assert recall_at_k(retrieved, relevant, 2) == (0.5 + 0.0) / 2
    assert recall_at_k(retrieved, relevant, 1) == 0.0


# ---------------------------------------------------------------------------------------------
# Cross-checks against torchmetrics (dev extra) and direct formulas.

SEEDS = st.integers(0, 2**31 - 1)


def _grouped_sample(seed, n, n_groups, n_levels):
    """Scores on a coarse grid (many ties, in [0, 1] so torchmetrics applies no sigmoid), random
    0/1 labels and random (non-contiguous, unsorted) group ids."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, n_levels, (n,), generator=g).double() / max(n_levels - 1, 1)
    labels = torch.randint(0, 2, (n,), generator=g)
    groups = torch.randint(0, n_groups, (n,), generator=g) * 7 - 3
    return scores, labels, groups


@settings(max_examples=40, deadline=None)
@given(SEEDS, st.integers(2, 200), st.integers(1, 20))
def test_auc_matches_torchmetrics(seed, n, n_levels):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, n_levels, (n,), generator=g).float() / max(n_levels - 1, 1)
    labels = torch.randint(0, 2, (n,), generator=g)
    if labels.min() == labels.max():
        labels[0] = 1 - labels[0]
    expected = BinaryAUROC()(scores, labels).item()
    assert abs(auc(scores, labels) - expected) < 1e-6


def _loop_gauc(scores, labels, groups, weighted):
    """Reference: a Python loop over the groups calling ``auc``."""
    num = den = 0.0
    for gid in groups.unique():
        m = groups == gid
        a = auc(scores[m], labels[m])
        if a != a:
            continue
        w = float(m.sum()) if weighted else 1.0
        num, den = num + w * a, den + w
    return num / den if den else float("nan")


@settings(max_examples=40, deadline=None)
@given(SEEDS, st.integers(1, 300), st.integers(1, 40), st.integers(1, 8), st.booleans())
def test_gauc_equals_loop_over_groups(seed, n, n_groups, n_levels, weighted):
    scores, labels, groups = _grouped_sample(seed, n, n_groups, n_levels)
    got, want = gauc(scores, labels, groups, weighted=weighted), _loop_gauc(scores, labels, groups, weighted)
    if math.isnan(want):
        assert math.isnan(got)
    else:
        assert abs(got - want) < 1e-12


@settings(max_examples=40, deadline=None)
@given(SEEDS, st.integers(2, 300), st.integers(1, 40), st.integers(1, 8))
def test_unweighted_gauc_matches_torchmetrics_retrieval_auroc(seed, n, n_groups, n_levels):
    """RetrievalAUROC skips groups without a positive (empty_target_action='skip') but scores a
    group without a negative as 0.0 rather than skipping it; gauc skips both. Drop the all-positive
    groups from torchmetrics' input (all-negative ones stay in, exercising 'skip'), which makes the
    two definitions identical."""
    scores, labels, groups = _grouped_sample(seed, n, n_groups, n_levels)
    _, inv = groups.unique(return_inverse=True)
    n_neg = torch.bincount(inv, weights=(labels == 0).double())
    keep = n_neg[inv] > 0
    want_defined = bool(((torch.bincount(inv, weights=labels.double()) > 0) & (n_neg > 0)).any())
    got = gauc(scores, labels, groups, weighted=False)
    if not want_defined:
        assert math.isnan(got)  # torchmetrics returns 0.0 here
        return
    metric = RetrievalAUROC(empty_target_action="skip")
    want = metric(scores[keep].float(), labels[keep], indexes=groups[keep] + 3).item()  # indexes >= 0
    assert abs(got - want) < 1e-6


def test_gauc_hand_example_and_weighting():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.2, 0.3, 0.4, 0.7, 0.7, 0.1])
    labels = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 1])
    groups = torch.tensor([5, 5, 9, 9, 9, -1, 2, 2, 2])
    # group 5: AUC 1 (n=2); group 9: pos {0.2, 0.3} vs neg {0.5}: 0 (n=3);
    # group -1: one class, skipped; group 2: pos {0.7, 0.1} vs neg {0.7}: (0.5 + 0) / 2 (n=3).
    assert gauc(scores, labels, groups, weighted=False) == pytest.approx((1 + 0 + 0.25) / 3)
    assert gauc(scores, labels, groups) == pytest.approx((2 * 1 + 3 * 0 + 3 * 0.25) / 8)
    assert math.isnan(gauc(scores, torch.ones(9), groups))
    assert math.isnan(gauc(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long)))


def test_gauc_is_fast():
    scores, labels, groups = _grouped_sample(0, 100_000, 5_000, 1000)
    # One intra-op thread and best of 5: on a busy shared machine, OpenMP threads waiting for a
    # taken core (not the algorithm) dominate; single-threaded it takes about 30 ms.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gauc(scores, labels, groups)  # warm-up
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            value = gauc(scores, labels, groups)
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    assert best < 0.2
    assert 0.4 < value < 0.6


@settings(max_examples=40, deadline=None)
@given(SEEDS, st.integers(1, 300), st.booleans(), st.floats(0.05, 20.0))
def test_ne_against_torch_bce_and_formula(seed, n, with_weights, scale):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, generator=g, dtype=torch.float64) * scale).float()
    logits[: n // 5] = logits[: n // 5].round()  # some ties
    labels = torch.randint(0, 2, (n,), generator=g).float()
    weights = torch.rand(n, generator=g, dtype=torch.float64) if with_weights else None
    w = torch.ones(n, dtype=torch.float64) if weights is None else weights
    x, y = logits.double(), labels.double()
    # BCE part: the stable logits form agrees with BCE on sigmoid(logits) where the latter is finite.
    ok = x.abs() < 15
    bce_logits = F.binary_cross_entropy_with_logits(x[ok], y[ok], weight=w[ok], reduction="sum")
    bce_probs = F.binary_cross_entropy(torch.sigmoid(x[ok]), y[ok], weight=w[ok], reduction="sum")
    assert torch.allclose(bce_logits, bce_probs, rtol=1e-9, atol=1e-12)
    # NE against the direct float64 formula (log-sigmoid written out).
    p = float((y * w).sum() / w.sum())
    got = ne(logits, labels, weights)
    if p in (0.0, 1.0):
        assert math.isnan(got)
        return
    per_example = -(y * -torch.log1p(torch.exp(-x)) + (1 - y) * -torch.log1p(torch.exp(x)))
    bce = float((per_example * w).sum() / w.sum())
    want = bce / -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert got == pytest.approx(want, rel=1e-9)


def test_ne_of_base_rate_predictor_is_one_and_nan_cases():
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0])
    logit = math.log(0.25 / 0.75)
    assert ne(torch.full((4,), logit), labels) == pytest.approx(1.0)
    assert ne(torch.tensor([50.0, -50.0, -50.0, -50.0]), labels) < 1e-6  # confident and right: ~0
    assert math.isnan(ne(torch.zeros(3), torch.zeros(3)))
    assert math.isnan(ne(torch.zeros(3), torch.ones(3)))
    assert math.isnan(ne(torch.zeros(0), torch.zeros(0)))
    # weights: a zero-weight example does not count, an integer weight equals repetition
    assert ne(
        torch.tensor([0.3, -1.0, 2.0]), torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 2.0, 0.0])
    ) == pytest.approx(ne(torch.tensor([0.3, -1.0, -1.0]), torch.tensor([1.0, 0.0, 0.0])))


def _full_corpus_sample(seed, b, n):
    """Scores without ties (a random permutation per row) and random targets."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.argsort(torch.rand(b, n, generator=g), dim=1).float()
    targets = torch.randint(0, n, (b,), generator=g)
    return scores, targets


@settings(max_examples=30, deadline=None)
@given(SEEDS, st.integers(1, 12), st.integers(1, 60), st.integers(1, 70), st.integers(1, 5))
def test_hit_rate_and_ndcg_match_torchmetrics(seed, b, n, k, chunk):
    scores, targets = _full_corpus_sample(seed, b, n)
    ranks = target_ranks(scores, targets, chunk=chunk)
    assert torch.equal(ranks, target_ranks(scores, targets))
    onehot = F.one_hot(targets, n).bool()
    indexes = torch.arange(b)[:, None].expand(b, n)
    want_hr = RetrievalHitRate(top_k=k)(scores.flatten(), onehot.flatten(), indexes=indexes.flatten()).item()
    want_ndcg = RetrievalNormalizedDCG(top_k=k)(scores.flatten(), onehot.flatten(), indexes=indexes.flatten()).item()
    assert hit_rate(ranks, k) == pytest.approx(want_hr, abs=1e-6)
    assert ndcg(ranks, k) == pytest.approx(want_ndcg, abs=1e-6)


def test_target_ranks_ties_are_optimistic_and_chunks_agree():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1], [1.0, 1.0, 1.0, 1.0], [0.0, -1.0, float("-inf"), 2.0]])
    targets = torch.tensor([0, 3, 1])
    expected = torch.tensor([1, 0, 2])  # only strictly higher scores count
    assert torch.equal(target_ranks(scores, targets), expected)
    for chunk in (1, 2, 3, 10):
        assert torch.equal(target_ranks(scores, targets, chunk=chunk), expected)
    assert target_ranks(scores, targets).dtype == torch.int64
    assert hit_rate(expected, 1) == pytest.approx(1 / 3)
    assert ndcg(expected, 2) == pytest.approx((1 / math.log2(3) + 1 + 0) / 3)
    assert ndcg(expected, 3) == pytest.approx((1 / math.log2(3) + 1 + 1 / math.log2(4)) / 3)
    assert target_ranks(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)).shape == (0,)
    assert math.isnan(hit_rate(torch.zeros(0, dtype=torch.long), 1))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: auc(torch.zeros(3), torch.zeros(4)), "1-d of one shape"),
        (lambda: gauc(torch.zeros(3), torch.zeros(3), torch.zeros(4, dtype=torch.long)), "1-d of one shape"),
        (lambda: gauc(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long)), "1-d"),
        (lambda: gauc(torch.zeros(3), torch.zeros(3), torch.zeros(3)), "integer"),
        (lambda: ne(torch.zeros(3), torch.zeros(2)), "1-d of one shape"),
        (lambda: ne(torch.zeros(3, 1), torch.zeros(3, 1)), "1-d"),
        (lambda: ne(torch.zeros(3), torch.zeros(3), torch.ones(2)), "1-d of one shape"),
        (lambda: ne(torch.zeros(2), torch.tensor([0.0, 2.0])), r"\[0, 1\]"),
        (lambda: ne(torch.zeros(2), torch.tensor([0.0, 1.0]), torch.tensor([1.0, -1.0])), "non-negative"),
        (lambda: target_ranks(torch.zeros(3), torch.zeros(3, dtype=torch.long)), "2-d"),
        (lambda: target_ranks(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long)), r"1-d \[B\]"),
        (lambda: target_ranks(torch.zeros(3, 4), torch.zeros(3)), "integer"),
        (lambda: target_ranks(torch.zeros(3, 4), torch.tensor([0, 4, 1])), r"\[0, 4\)"),
        (lambda: target_ranks(torch.zeros(3, 4), torch.tensor([0, -1, 1])), r"\[0, 4\)"),
        (lambda: target_ranks(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), chunk=0), "chunk"),
        (lambda: target_ranks(torch.full((1, 2), float("nan")), torch.zeros(1, dtype=torch.long)), "NaN"),
        (lambda: hit_rate(torch.zeros(3, dtype=torch.long), 0), "k must be"),
        (lambda: ndcg(torch.zeros(3, dtype=torch.long), 0), "k must be"),
        (lambda: ndcg(torch.zeros(3, dtype=torch.long), 2.0), "k must be"),
        (lambda: hit_rate(torch.zeros(3, 1, dtype=torch.long), 1), "1-d"),
        (lambda: ndcg(torch.zeros(3), 1), "integer"),
        (lambda: hit_rate(torch.tensor([0, -1]), 1), "non-negative"),
    ],
)
def test_validation_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
