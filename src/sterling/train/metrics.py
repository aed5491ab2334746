"""Evaluation metrics in plain torch: AUC per task and full-catalogue recall@k.

Protocol: retrieval metrics rank the *whole catalogue* (no sampled negatives).
"""

from __future__ import annotations

import torch

__all__ = ["auc", "recall_at_k"]


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half).

    Args:
        scores (torch.Tensor): float ``[n]``.
        labels (torch.Tensor): ``[n]`` with values 0/1.

    Returns:
        float: AUC, or NaN when ``labels`` has one class only.
    """
    if scores.shape != labels.shape or scores.dim() != 1:
        raise ValueError(f"scores and labels must be 1-d of one shape, got {tuple(scores.shape)} and {tuple(labels.shape)}")
    pos = labels > 0
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    s = scores.double()
    uniq, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    # Average rank of each distinct score (1-based): ties share the mean of their ranks.
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    rank_sum = mean_rank[inverse][pos].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def recall_at_k(retrieved: torch.Tensor, relevant: list[set[int]], k: int) -> float:
    """Mean over queries of |top-k ∩ relevant| / min(k, |relevant|), queries without relevant items
    skipped.

    Args:
        retrieved (torch.Tensor): int64 ``[B, >= k]`` ranked ids (-1 = empty slot).
        relevant (list[set[int]]): ``B`` sets of relevant ids.
        k (int): cut-off.
    """
    if retrieved.shape[0] != len(relevant):
        raise ValueError(f"{retrieved.shape[0]} result rows for {len(relevant)} relevance sets")
    values = [
        len(set(row[:k].tolist()) & rel) / min(k, len(rel))
        for row, rel in zip(retrieved, relevant)
        if rel
    ]
    return sum(values) / len(values) if values else float("nan")
