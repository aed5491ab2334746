"""The losses of next-item retrieval (described in :mod:`sterling.train.retrieval`): the full
softmax over the whole catalogue, or the sampled softmax over in-batch targets and shared negatives
with same-user items masked and an optional logQ correction; and their per-task form for a
``--multi-task`` retriever."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sterling.models import jagged
from sterling.train.sequence_model import SequenceRetriever
from sterling.train.sequence_split import Sequences

__all__ = [
    "FusedSoftmaxCrossEntropy",
    "batch_loss",
    "candidate_log_q",
    "full_softmax_loss",
    "multi_task_loss",
    "reference_cross_entropy",
    "sampled_softmax_loss",
    "task_bits",
    "trained_positions",
]


def sampled_softmax_loss(
    queries: torch.Tensor,
    targets: torch.Tensor,
    owner: torch.Tensor,
    seq_items: torch.Tensor,
    seq_offsets: torch.Tensor,
    negatives: torch.Tensor,
    embed: Callable[[torch.Tensor], torch.Tensor],
    temperature: float,
    log_q: torch.Tensor | None = None,
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
        log_q (torch.Tensor | None): float ``[N]`` per item row, the log of its chance of being a
            candidate (:func:`candidate_log_q`), subtracted from its logits (the logQ correction);
            None: no correction.

    Returns:
        torch.Tensor: the mean cross-entropy (a scalar).
    """
    counts = torch.ones(targets.numel(), 1, dtype=torch.bool)
    return multi_task_loss(
        queries[:, None], targets, counts, owner, seq_items, seq_offsets, negatives, embed, temperature, log_q
    )[0]


def full_softmax_loss(
    queries: torch.Tensor,
    targets: torch.Tensor,
    vectors: torch.Tensor,
    temperature: float,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy over the whole catalogue, per head (no masking, no sampling).

    Args:
        queries (torch.Tensor): float ``[P, H, D]`` unit-norm queries, per position and head.
        targets (torch.Tensor): int64 ``[P]`` the next item (row) of each position.
        vectors (torch.Tensor): float ``[N, D]`` every item's unit-norm vector.
        temperature (float): logits are cosine / temperature.
        counts (torch.Tensor | None): bool ``[P, H]``, the positions each head counts (None: all).

    Returns:
        torch.Tensor: float ``[H]`` the heads' mean cross-entropies (0 for a head counting none).
    """
    return _head_losses(queries, targets, counts, vectors, None, None, temperature)


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
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per head, the sampled softmax of :func:`sampled_softmax_loss` over the positions it counts.

    Every head scores the same candidates (the batch's targets, all of them, and ``negatives``)
    with the same same-user mask; head ``h``'s loss is the mean cross-entropy over the positions
    with ``counts[:, h]`` (0 where it counts none). A head counting every position is exactly
    :func:`sampled_softmax_loss` of its queries.

    Args:
        queries (torch.Tensor): float ``[P, H, D]`` unit-norm queries, per position and head.
        counts (torch.Tensor): bool ``[P, H]``: position ``p``'s target is a positive of head ``h``.
        targets, owner, seq_items, seq_offsets, negatives, embed, temperature, log_q: as
            :func:`sampled_softmax_loss`.

    Returns:
        torch.Tensor: float ``[H]`` the heads' losses.
    """
    candidates, positive, mask = _candidates(targets, owner, seq_items, seq_offsets, negatives)
    bias = None if log_q is None else log_q[candidates]  # [C]
    return _head_losses(queries, positive, counts, embed(candidates), mask, bias, temperature)


#: Positions per chunk of :class:`FusedSoftmaxCrossEntropy`: a ``[chunk, N]`` logit block of a few
#: thousand items stays in the CPU's cache between the matmul, the softmax and the gradient.
FUSED_CHUNK = 128


class FusedSoftmaxCrossEntropy(torch.autograd.Function):
    """The mean cross-entropy of ``targets [P]`` over the logits ``scale · queries [P, D] ·
    vectors [N, D]ᵀ``, never holding the ``[P, N]`` logits: ``chunk`` positions at a time, the
    forward computes each block's log-sum-exp and, while the block is in cache, its gradient
    ``(softmax − onehot) · scale / P``, accumulated into ``∂/∂queries [P, D]`` and
    ``∂/∂vectors [N, D]``; the backward only scales them. Equal to
    ``F.cross_entropy(scale * queries @ vectors.T, targets)`` (:func:`reference_cross_entropy`, the
    reference the tests compare it with), with three matmuls and one pass over each block instead
    of the softmax's several passes over ``[P, N]`` in memory (the "fused linear cross-entropy" of
    Liger-Kernel / Cut Cross-Entropy)."""

    @staticmethod
    def forward(ctx, queries, vectors, targets, scale, chunk=FUSED_CHUNK):
        p = queries.shape[0]
        grad_q = torch.empty_like(queries)
        grad_v = torch.zeros_like(vectors)
        total = queries.new_zeros(())
        for s in range(0, p, chunk):
            q, t = queries[s : s + chunk], targets[s : s + chunk]  # [c, D], [c]
            logits = (q @ vectors.T).mul_(scale)  # [c, N]
            rows = torch.arange(t.numel())
            target = logits[rows, t]  # [c]
            peak = logits.amax(1)  # [c]
            grad = logits.sub_(peak[:, None]).exp_()  # in place: one exp per logit
            norm = grad.sum(1)  # [c]
            total += (peak + norm.log() - target).sum()  # log-sum-exp − target logit
            grad.div_(norm[:, None])  # the softmax
            grad[rows, t] -= 1.0
            grad.mul_(scale / p)
            grad_q[s : s + chunk] = grad @ vectors
            grad_v.addmm_(grad.T, q)
        ctx.save_for_backward(grad_q, grad_v)
        return total / p

    @staticmethod
    def backward(ctx, grad_out):
        grad_q, grad_v = ctx.saved_tensors
        return grad_q * grad_out, grad_v * grad_out, None, None, None


def reference_cross_entropy(queries: torch.Tensor, vectors: torch.Tensor, targets: torch.Tensor, scale: float):
    """The reference of :class:`FusedSoftmaxCrossEntropy`: the whole ``[P, N]`` logits at once."""
    return F.cross_entropy((queries * scale) @ vectors.T, targets)


def _head_losses(
    queries: torch.Tensor,
    positive: torch.Tensor,
    counts: torch.Tensor | None,
    vectors: torch.Tensor,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """float ``[H]``: per head ``h``, the mean cross-entropy of ``positive [P]`` (a column of
    ``vectors [C, D]``) over the positions ``counts[:, h]`` counts (all when None; 0 for none),
    logits ``queries [P, H, D] · vectors / temperature − bias [C]``, ``mask [P, C]`` out."""
    losses = []
    for h in range(queries.shape[1]):
        keep = slice(None) if counts is None else counts[:, h]
        if counts is not None and not bool(keep.any()):
            losses.append(queries.new_zeros(()))
            continue
        if bias is None and mask is None:  # the full softmax: fused, no [P_h, C] logits kept
            losses.append(FusedSoftmaxCrossEntropy.apply(queries[keep, h], vectors, positive[keep], 1.0 / temperature))
            continue
        logits = (queries[keep, h] / temperature) @ vectors.T  # [P_h, C]
        if bias is not None:
            logits = logits - bias
        if mask is not None:
            logits = logits.masked_fill(mask[keep], float("-inf"))
        losses.append(F.cross_entropy(logits, positive[keep]))
    return torch.stack(losses)


def candidate_log_q(target_counts: torch.Tensor, positions: float, num_negatives: int) -> torch.Tensor:
    """float ``[N]``: the log of each item's chance of being a candidate of a sampled-softmax batch
    (:func:`sampled_softmax_loss`), for the logQ correction.

    A batch's candidates are its ``positions`` targets (each item ``i`` drawn with its share
    ``p_i`` of ``target_counts [N]``, its count as a training target) and ``num_negatives``
    uniform items, de-duplicated, so ``P(i is a candidate) = 1 − (1 − p_i)^positions ·
    (1 − 1/N)^num_negatives``, the targets taken as independent draws (an approximation: a
    user's targets are not). An item that is never a target keeps the uniform draw's share."""
    n = target_counts.numel()
    p = target_counts.double() / max(float(target_counts.sum()), 1.0)
    log_absent = positions * torch.log1p(-p.clamp(max=1 - 1e-12)) + num_negatives * math.log1p(-1 / max(n, 2))
    return torch.log(-torch.expm1(log_absent)).clamp(min=-80.0).float()


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


def batch_loss(
    model: SequenceRetriever,
    batch: Sequences,
    negatives: torch.Tensor | None,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of one batch of training sequences (every position with a next item is trained):
    the full softmax over the catalogue when ``negatives`` is None, else the sampled softmax with
    those shared negatives (and the logQ correction ``log_q [N]`` when given); a multi-task model's
    adds each task's loss over the positions whose next event has its bit (module docstring; the
    batch needs its ``actions``)."""
    queries = model(batch.items, batch.ts, batch.offsets)  # [L, D]
    anchor = trained_positions(batch.offsets)  # [P]
    counts = torch.ones(len(anchor), 1, dtype=torch.bool)  # next: every position
    if model.tasks:
        if batch.actions is None:
            raise ValueError("a multi-task retriever trains on sequences with their actions")
        counts = torch.cat([counts, task_bits(batch.actions[anchor + 1], len(model.tasks))], 1)  # [P, 1 + T]
    heads, targets = model.all_queries(queries[anchor]), batch.items[anchor + 1]  # [P, 1 + T, D], [P]
    if negatives is None:
        return full_softmax_loss(heads, targets, model.item_vectors(), model.cfg.temperature, counts).sum()
    owner, _ = jagged.row_and_column(batch.offsets)
    return multi_task_loss(
        heads,
        targets,
        counts,
        owner[anchor],
        batch.items,
        batch.offsets,
        negatives,
        model.item_vectors,
        model.cfg.temperature,
        log_q,
    ).sum()
