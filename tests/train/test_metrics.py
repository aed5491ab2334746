import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.train.metrics import auc, recall_at_k


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
