"""The leave-last-out split of users' timelines for next-item retrieval (the split described in
:mod:`sterling.train.retrieval`): jagged training sequences, and validation / test histories with
their targets (and the targets' action bitmasks, for per-task metrics)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sterling.models import jagged

__all__ = ["TIE_ORDERS", "TRAIN_EVENTS", "EvalSet", "LeaveLastOut", "Sequences", "leave_last_out", "shuffled_ties"]

#: The order of a user's events of the same second: ``stored`` (the data format's canonical order,
#: by item id) or ``shuffled`` (by a fixed hash of the user and the item: no order a model can learn).
TIE_ORDERS = ("shuffled", "stored")
#: The events of a user's training timeline that are trained on: ``latest`` (its most recent
#: ``max_len``, GR's) or ``all`` (also the earlier ones, in windows of ``max_len``: :func:`earlier_windows`).
TRAIN_EVENTS = ("latest", "all")


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


def shuffled_ties(offsets: np.ndarray, items: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """int64 ``[E]``: the permutation of timelines (``offsets [U + 1]``, ``items``, ``ts`` ``[E]``,
    sorted by time within each user) that orders each user's events of the same second by a fixed
    hash of (user, item) instead of their stored order; the rest stays in place.

    Events of one second have no known order (MovieLens rates a page of movies at once), and the
    stored one is by item id: a model trained and evaluated on it learns "ids ascend within a burst"
    (on ML-100K, HSTU's HR@10 read 15% higher with it). The hash is the same in every run and for
    every model, like the arbitrary order GR's unstable sort leaves."""
    offsets, items, ts = (np.asarray(a, dtype=np.int64) for a in (offsets, items, ts))
    user = np.repeat(np.arange(len(offsets) - 1, dtype=np.uint64), np.diff(offsets))
    with np.errstate(over="ignore"):  # splitmix64 of (user, item): wrapping arithmetic
        z = user * np.uint64(0x9E3779B97F4A7C15) + items.astype(np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        key = z ^ (z >> np.uint64(31))
    return np.lexsort((key, ts, user)).astype(np.int64)


def earlier_windows(first: np.ndarray, start: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The windows that cover the events before ``start [U]`` (a timeline's latest training window
    begins there; its first event is at ``first [U]``): ``(row, window_start, window_end)``, each
    ``[W]``, ``row`` the index into ``first``. Going back from ``start``, each window holds up to
    ``max_len`` events and ends one event after the next one begins, so every event after ``first``
    is a next-item target exactly once over all of a timeline's windows (the latest included)."""
    stride = max_len - 1
    count = np.where(start > first, -((first - start) // stride), 0)  # ceil((start - first) / stride)
    row = np.repeat(np.arange(len(first), dtype=np.int64), count)
    back = np.arange(int(count.sum()), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)  # 0, 1, …
    end = start[row] + 1 - back * stride
    return row, np.maximum(first[row], end - max_len), end


def leave_last_out(
    offsets: np.ndarray,
    items: np.ndarray,
    ts: np.ndarray,
    max_len: int,
    actions: np.ndarray | None = None,
    holdout: int = 2,
    ties: str = "stored",
    train_events: str = "latest",
) -> LeaveLastOut:
    """Split timelines (``offsets [U + 1]``, ``items``, ``ts`` ``[E]``, oldest first per user) into
    training sequences and validation / test histories with their targets (module docstring);
    with the events' action bitmasks ``actions [E]``, the sequences carry theirs and the held-out
    sets their targets'. ``holdout``: the events of an evaluated user kept out of training, 2
    (the validation and the test target) or 1 (GR's ``ignore_last_n = 1``: only the test target;
    the validation target is then a training target too, and ``valid`` is no longer held out).
    ``ties``: the order of a user's events of the same second (:data:`TIE_ORDERS`;
    :func:`shuffled_ties`). ``train_events``: :data:`TRAIN_EVENTS`; with ``"all"`` a timeline longer
    than ``max_len`` gives several training sequences (:func:`earlier_windows`), the latest first
    in ``train``, then the earlier ones (their ``users`` repeat)."""
    if holdout not in (1, 2):
        raise ValueError(f"holdout must be 1 or 2, got {holdout}")
    if ties not in TIE_ORDERS:
        raise ValueError(f"ties must be one of {TIE_ORDERS}, got {ties!r}")
    if train_events not in TRAIN_EVENTS:
        raise ValueError(f"train_events must be one of {TRAIN_EVENTS}, got {train_events!r}")
    offsets, items, ts = (np.asarray(a, dtype=np.int64) for a in (offsets, items, ts))
    if actions is not None:
        actions = np.asarray(actions, dtype=np.int64)
    if ties == "shuffled":
        order = shuffled_ties(offsets, items, ts)
        items, ts = items[order], ts[order]
        actions = None if actions is None else actions[order]
    first, stop = offsets[:-1], offsets[1:]
    evaluated = (stop - first) >= 3
    train_end = np.where(evaluated, stop - holdout, stop)
    train_start = np.maximum(first, train_end - max_len)
    keep = (train_end - train_start) >= 2
    rows = np.arange(len(first), dtype=np.int64)
    users, starts, ends = rows[keep], train_start[keep], train_end[keep]
    if train_events == "all":
        row, start, end = earlier_windows(first[keep], starts, max_len)
        users, starts, ends = (np.concatenate(p) for p in ((users, users[row]), (starts, start), (ends, end)))
    train = _ranges(offsets, items, ts, users, starts, ends, actions)

    def held_out(target: np.ndarray) -> EvalSet:
        u = rows[evaluated]
        at = target[evaluated]
        history = _ranges(offsets, items, ts, u, np.maximum(first[evaluated], at - max_len), at, actions)
        seen = _ranges(offsets, items, ts, u, first[evaluated], at)
        target_actions = None if actions is None else torch.from_numpy(actions[at].copy())
        t = torch.from_numpy
        return EvalSet(history, t(items[at].copy()), target_actions, seen.items, seen.offsets, t(ts[at].copy()))

    return LeaveLastOut(train, held_out(stop - 2), held_out(stop - 1))
