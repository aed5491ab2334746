"""The leave-last-out split of users' timelines for next-item retrieval (the split described in
:mod:`sterling.train.retrieval`): jagged training sequences, and validation / test histories with
their targets (and the targets' action bitmasks, for per-task metrics)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sterling.models import jagged

__all__ = ["EvalSet", "LeaveLastOut", "Sequences", "leave_last_out"]


@dataclass(frozen=True)
class Sequences:
    """Jagged event sequences: ``items``, ``ts`` int64 ``[L]`` (oldest first within a row),
    ``offsets`` int64 ``[B + 1]``, ``users`` int64 ``[B]`` (the timeline row of each sequence),
    ``actions`` int64 ``[L]`` the events' action bitmasks (None: not loaded)."""

    items: torch.Tensor
    ts: torch.Tensor
    offsets: torch.Tensor
    users: torch.Tensor
    actions: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.users.numel())

    def rows(self, rows: torch.Tensor) -> Sequences:
        """The sequences ``rows [M]``, in that order."""
        index, offsets = jagged.gather_rows(self.offsets, rows)
        actions = None if self.actions is None else self.actions[index]
        return Sequences(self.items[index], self.ts[index], offsets, self.users[rows], actions)


@dataclass(frozen=True)
class EvalSet:
    """Histories and the next item of each: ``targets`` int64 ``[B]``, and its action bitmask
    ``target_actions`` int64 ``[B]`` (None: not loaded). ``seen_items`` int64 ``[S]`` (offsets
    ``seen_offsets [B + 1]``): every item of the user's timeline before the target, the history
    not cut to ``max_len`` (None: not kept), what evaluation with seen items excluded removes.
    ``target_ts`` int64 ``[B]``: the target's timestamp, the time its request was made (None: not
    kept; a query's time is then its last event's)."""

    history: Sequences
    targets: torch.Tensor
    target_actions: torch.Tensor | None = None
    seen_items: torch.Tensor | None = None
    seen_offsets: torch.Tensor | None = None
    target_ts: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.history)


@dataclass(frozen=True)
class LeaveLastOut:
    """The leave-last-out split of the module docstring."""

    train: Sequences
    valid: EvalSet
    test: EvalSet


def _ranges(
    offsets: np.ndarray,
    items: np.ndarray,
    ts: np.ndarray,
    users: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    actions: np.ndarray | None = None,
) -> Sequences:
    """The event ranges ``[start[i], end[i])`` as jagged sequences."""
    lens = end - start
    out_offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=out_offsets[1:])
    index = np.repeat(start - out_offsets[:-1], lens) + np.arange(out_offsets[-1])
    t = torch.from_numpy
    acts = None if actions is None else t(actions[index].copy())
    return Sequences(t(items[index].copy()), t(ts[index].copy()), t(out_offsets), t(users.copy()), acts)


def leave_last_out(
    offsets: np.ndarray,
    items: np.ndarray,
    ts: np.ndarray,
    max_len: int,
    actions: np.ndarray | None = None,
    holdout: int = 2,
) -> LeaveLastOut:
    """Split timelines (``offsets [U + 1]``, ``items``, ``ts`` ``[E]``, oldest first per user) into
    training sequences and validation / test histories with their targets (module docstring);
    with the events' action bitmasks ``actions [E]``, the sequences carry theirs and the held-out
    sets their targets'. ``holdout``: the events of an evaluated user kept out of training, 2
    (the validation and the test target) or 1 (GR's ``ignore_last_n = 1``: only the test target;
    the validation target is then a training target too, and ``valid`` is no longer held out)."""
    if holdout not in (1, 2):
        raise ValueError(f"holdout must be 1 or 2, got {holdout}")
    offsets, items, ts = (np.asarray(a, dtype=np.int64) for a in (offsets, items, ts))
    if actions is not None:
        actions = np.asarray(actions, dtype=np.int64)
    first, stop = offsets[:-1], offsets[1:]
    evaluated = (stop - first) >= 3
    train_end = np.where(evaluated, stop - holdout, stop)
    train_start = np.maximum(first, train_end - max_len)
    keep = (train_end - train_start) >= 2
    rows = np.arange(len(first), dtype=np.int64)
    train = _ranges(offsets, items, ts, rows[keep], train_start[keep], train_end[keep], actions)

    def held_out(target: np.ndarray) -> EvalSet:
        u = rows[evaluated]
        at = target[evaluated]
        history = _ranges(offsets, items, ts, u, np.maximum(first[evaluated], at - max_len), at, actions)
        seen = _ranges(offsets, items, ts, u, first[evaluated], at)
        target_actions = None if actions is None else torch.from_numpy(actions[at].copy())
        t = torch.from_numpy
        return EvalSet(history, t(items[at].copy()), target_actions, seen.items, seen.offsets, t(ts[at].copy()))

    return LeaveLastOut(train, held_out(stop - 2), held_out(stop - 1))
