"""The losses of next-item retrieval (described in :mod:`sterling.train.retrieval`): the sampled
softmax over in-batch targets and shared negatives with same-user items masked, and its per-task
form for a ``--multi-task`` retriever."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sterling.models import jagged
from sterling.train.sequence_model import SequenceRetriever
from sterling.train.sequence_split import Sequences

__all__ = ["batch_loss", "multi_task_loss", "sampled_softmax_loss", "task_bits", "trained_positions"]


def sampled_softmax_loss(
    queries: torch.Tensor,
    targets: torch.Tensor,
    owner: torch.Tensor,
    seq_items: torch.Tensor,
    seq_offsets: torch.Tensor,
    negatives: torch.Tensor,
    embed: Callable[[torch.Tensor], torch.Tensor],
    temperature: float,
) -> torch.Tensor:
    """Sampled softmax over in-batch targets + shared random negatives, same-user items masked.

    Args:
        queries (torch.Tensor): float ``[P, D]`` unit-norm queries of the trained positions.
        targets (torch.Tensor): int64 ``[P]`` the next item of each position.
        owner (torch.Tensor): int64 ``[P]`` the batch sequence (row of ``seq_offsets``) of each position.
        seq_items (torch.Tensor): int64 ``[L]`` the batch's sequences, offsets ``seq_offsets [B + 1]``.
        negatives (torch.Tensor): int64 ``[M]`` random items shared by the batch.
        embed (Callable): item rows ``[C]`` → unit-norm vectors ``[C, D]``.
        temperature (float): logits are cosine / temperature.

    Returns:
        torch.Tensor: the mean cross-entropy (a scalar).
    """
    candidates, positive, mask = _candidates(targets, owner, seq_items, seq_offsets, negatives)
    logits = (queries / temperature) @ embed(candidates).T  # [P, C]
    return F.cross_entropy(logits.masked_fill(mask, float("-inf")), positive)


def multi_task_loss(
    queries: torch.Tensor,
    targets: torch.Tensor,
    counts: torch.Tensor,
    owner: torch.Tensor,
    seq_items: torch.Tensor,
    seq_offsets: torch.Tensor,
    negatives: torch.Tensor,
    embed: Callable[[torch.Tensor], torch.Tensor],
    temperature: float,
) -> torch.Tensor:
    """Per head, the sampled softmax of :func:`sampled_softmax_loss` over the positions it counts.

    Every head scores the same candidates (the batch's targets, all of them, and ``negatives``)
    with the same same-user mask; head ``h``'s loss is the mean cross-entropy over the positions
    with ``counts[:, h]`` (0 where it counts none). A head counting every position is exactly
    :func:`sampled_softmax_loss` of its queries.

    Args:
        queries (torch.Tensor): float ``[P, H, D]`` unit-norm queries, per position and head.
        counts (torch.Tensor): bool ``[P, H]``: position ``p``'s target is a positive of head ``h``.
        targets, owner, seq_items, seq_offsets, negatives, embed, temperature: as
            :func:`sampled_softmax_loss`.

    Returns:
        torch.Tensor: float ``[H]`` the heads' losses.
    """
    candidates, positive, mask = _candidates(targets, owner, seq_items, seq_offsets, negatives)
    vectors = embed(candidates)  # [C, D]
    losses = []
    for h in range(queries.shape[1]):
        keep = counts[:, h]
        if not bool(keep.any()):
            losses.append(queries.new_zeros(()))
            continue
        logits = (queries[keep, h] / temperature) @ vectors.T  # [P_h, C]
        losses.append(F.cross_entropy(logits.masked_fill(mask[keep], float("-inf")), positive[keep]))
    return torch.stack(losses)


def _candidates(
    targets: torch.Tensor,
    owner: torch.Tensor,
    seq_items: torch.Tensor,
    seq_offsets: torch.Tensor,
    negatives: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The de-duplicated candidates ``[C]`` (sorted), each position's positive column ``[P]`` and
    the same-user mask ``[P, C]`` (True: out of the position's softmax)."""
    p = targets.numel()
    candidates, inverse = torch.unique(torch.cat([targets, negatives]), return_inverse=True)  # sorted [C]
    positive = inverse[:p]  # [P]
    # member[b, c]: candidate c is an item of batch sequence b
    row, _ = jagged.row_and_column(seq_offsets)
    at = torch.searchsorted(candidates, seq_items).clamp(max=candidates.numel() - 1)
    hit = candidates[at] == seq_items
    member = torch.zeros(seq_offsets.numel() - 1, candidates.numel(), dtype=torch.bool)
    member[row[hit], at[hit]] = True
    mask = member[owner]  # [P, C]
    mask[torch.arange(p), positive] = False
    return candidates, positive, mask


def task_bits(actions: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """bool ``[n, T]``: action bitmasks ``[n]`` → whether each event has task ``j``'s bit ``j``."""
    return ((actions[:, None] >> torch.arange(num_tasks)) & 1).bool()


def trained_positions(offsets: torch.Tensor) -> torch.Tensor:
    """int64 ``[P]``: every token of a jagged batch that has a next token in its sequence."""
    has_next = torch.ones(int(offsets[-1]), dtype=torch.bool)
    lens = jagged.lengths(offsets)
    has_next[(offsets[1:] - 1)[lens > 0]] = False
    return torch.nonzero(has_next).squeeze(1)


def batch_loss(model: SequenceRetriever, batch: Sequences, negatives: torch.Tensor) -> torch.Tensor:
    """The loss of one batch of training sequences (every position with a next item is trained);
    a multi-task model's adds each task's loss over the positions whose next event has its bit
    (module docstring; the batch needs its ``actions``)."""
    queries = model(batch.items, batch.ts, batch.offsets)  # [L, D]
    anchor = trained_positions(batch.offsets)  # [P]
    owner, _ = jagged.row_and_column(batch.offsets)
    if model.tasks:
        if batch.actions is None:
            raise ValueError("a multi-task retriever trains on sequences with their actions")
        bits = task_bits(batch.actions[anchor + 1], len(model.tasks))  # [P, T]
        counts = torch.cat([torch.ones(len(anchor), 1, dtype=torch.bool), bits], 1)  # next: every position
        return multi_task_loss(
            model.all_queries(queries[anchor]),
            batch.items[anchor + 1],
            counts,
            owner[anchor],
            batch.items,
            batch.offsets,
            negatives,
            model.item_vectors,
            model.cfg.temperature,
        ).sum()
    return sampled_softmax_loss(
        queries[anchor],
        batch.items[anchor + 1],
        owner[anchor],
        batch.items,
        batch.offsets,
        negatives,
        model.item_vectors,
        model.cfg.temperature,
    )
