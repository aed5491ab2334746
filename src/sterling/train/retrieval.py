"""Retrieval training of the sequential user towers (HSTU, SASRec): next-item prediction over whole
user timelines, the research setting of generative-recommenders (HSTU paper §4.1.1, spec
``roo.md`` §7.2).

**Model**: :class:`~sterling.train.sequence_model.SequenceRetriever` (item-id embeddings, an HSTU or
SASRec encoder, a unit-norm next-item query at every position; scored by cosine with the
L2-normalised item embeddings), configured by :class:`~sterling.train.sequence_model.RetrievalConfig`.

**Split: leave-last-out**, the same for both towers. For a user with ``n >= 3`` events ``e_0 …
e_{n-1}``:

* train: the sequence ``e_0 … e_{n-3}`` (the last ``max_len`` of it): every position but the
  last predicts the next event;
* validation: target ``e_{n-2}``, history ``e_0 … e_{n-3}``;
* test: target ``e_{n-1}``, history ``e_0 … e_{n-2}`` (so it holds the validation item, which the
  model never trained on).

Events are in timeline order (MovieLens: by timestamp, then item id). Histories are truncated to
their most recent ``max_len`` events. Neither target, nor anything after
it, is in the training data or in its own history. Users with fewer than three events are not
evaluated; they train on their whole timeline (when it has two events or more). GR trains on all
but the last event (``ignore_last_n = 1``) and has no validation set; holding out two events costs
each user one training target and keeps validation clean of the test target. ``holdout = 1``
(``RetrievalConfig.holdout``) is GR's split: training ends before the test target, so the
validation target is trained on; nothing is then validated or selected, the run trains its
``epochs`` and reports the last model.

**Loss** (``RetrievalConfig.loss``). **Full softmax** (``"full"``, and ``"auto"`` when one step's
logits, ``batch_size × max_len × N``, fit :data:`~sterling.train.sequence_model.FULL_SOFTMAX_LOGITS`,
1 GiB: every MovieLens set): each trained position ``p`` (query ``q_p``, target ``t_p``) is scored
against every item, logits ``q_p · ê / temperature``, cross-entropy of ``t_p``, averaged over
positions. Nothing is masked: the user's other items are negatives like any other, which is what
the evaluation (earlier items stay in the ranking) rewards. **Sampled softmax** (``"sampled"``, and
``"auto"`` for larger catalogues): one candidate set shared by the batch, its distinct target items
(in-batch positives) plus ``num_negatives`` uniform random items, **de-duplicated**, so each item is
one column and a random draw equal to ``t_p`` *is* the positive column; a candidate that is any
item of the anchor's own sequence in the batch (other than ``t_p``) is removed from ``p``'s
softmax; and the **logQ correction**: each candidate's logit is lowered by the log of its chance of
being a candidate (:func:`~sterling.train.sequence_loss.candidate_log_q`: frequent targets are
candidates more often), so the sampled softmax estimates the full one. GR samples 128 uniform
negatives per position and masks only those equal to the positive. ``warmup_steps`` ramps the
learning rate linearly from 0, and ``lr_decay = "cosine"`` then decays it to 0 at the last
planned step (:func:`lr_schedule`).

**Multi-task** (``RetrievalConfig.multi_task``, ``sterling train --model hstu --multi-task``): the
tasks are the dataset's labels (``users.parquet``'s roles; action bit ``j`` of a timeline event is
task ``j``: synthetic click / like / share, MovieLens like (rating >= 4) / love (5)). The model
adds one task query per task over every position's output
(:meth:`~sterling.train.sequence_model.SequenceRetriever.all_queries`); the **next** query is the
plain output, as in a single-task model, not one of the task heads. The loss is the next query's
softmax (as above) **plus, per task, the same softmax of that task's query over only the positions
whose next event has the task's bit** (the other positions are masked out of that task's loss; a
task without a positive in the batch adds 0). Every head shares one candidate set (and, sampled,
its same-user mask: :func:`multi_task_loss`); each head's loss is the mean over its own positions,
and the heads are summed with weight 1.

**Evaluation: full corpus.** The query at the last position of the history scores every item of
the catalogue (no sampling); the target's rank is the number of items scoring strictly higher
(:func:`~sterling.train.metrics.target_ranks`). History items are **not** excluded from the
ranking (GR's evaluation code excludes the history window, ``eval.py`` ``filter_invalid_ids=True``:
that is the ``unseen/`` protocol below, up to the window). HR@k and NDCG@k at ``cutoffs`` (10
always) and MRR for validation and test, computed ``eval_chunk`` users at a time; a most-popular baseline (train-target counts) beside them.
With ``exclude_seen`` the same metrics again with every item of the user's timeline before the
target (not only the last ``max_len``) removed from the ranking, under keys ``unseen/hr@10`` …
(the common protocol on data without repeats; the most-popular list too). A
multi-task model adds, per task, ``hr@10:<task>``: the HR@10 of the task's query over the users
whose held-out event has the task's bit, and ``hr@10:<task>(next)``: the next query's on the same
users (:func:`task_metrics`). Model selection reads the next query's full-corpus NDCG@10 either way.

**Model selection and checkpoints.** With a checkpoint directory (``out_dir``) or ``patience``,
the model is validated after every epoch; the epoch with the best validation NDCG@10 is the one
reported (its weights are restored before the test evaluation; the last model's test metrics are
kept beside them), and ``patience`` stops a run that has not improved for that many epochs. The
test targets never select anything. ``out_dir/best`` and ``out_dir/last`` are sequence checkpoints
(:mod:`sterling.train.sequence_checkpoint`), what ``sterling publish`` serves.

Example::

    report = train_retrieval(Path("runs/ml-1m-subset"), RetrievalConfig(encoder="hstu", epochs=20, patience=3),
                             out_dir=Path("runs/hstu"))
    print(report.best_epoch, report.test["hr@10"], report.test["ndcg@10"])   # runs/hstu/best, runs/hstu/last
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from sterling.data.batch import ItemCatalog, UserTimelines
from sterling.data.items import read_items
from sterling.data.schema import DatasetPaths, read_roles
from sterling.models import jagged
from sterling.train.metrics import hit_rate, ndcg, target_ranks
from sterling.train.progress import progress_bar
from sterling.train.sequence_checkpoint import write_sequence_checkpoint
from sterling.train.sequence_loss import (
    batch_loss,
    candidate_log_q,
    full_softmax_loss,
    multi_task_loss,
    sampled_softmax_loss,
    task_bits,
    trained_positions,
)
from sterling.train.sequence_model import RetrievalConfig, SequenceRetriever
from sterling.train.sequence_split import EvalSet, LeaveLastOut, Sequences, leave_last_out

__all__ = [
    "EvalSet",
    "LeaveLastOut",
    "RetrievalConfig",
    "RetrievalReport",
    "SequenceRetriever",
    "Sequences",
    "UNSEEN",
    "batch_loss",
    "candidate_log_q",
    "evaluate_ranks",
    "full_softmax_loss",
    "leave_last_out",
    "load_catalog_timelines",
    "load_task_names",
    "load_timelines",
    "lr_schedule",
    "multi_task_loss",
    "popularity_ranks",
    "protocol_ranks",
    "query_ranks",
    "ranking_metrics",
    "sampled_softmax_loss",
    "task_bits",
    "task_metrics",
    "train_retrieval",
]

CUTOFFS = (10, 50)
#: The prefix of the metrics evaluated with the user's seen items excluded (``unseen/hr@10``).
UNSEEN = "unseen/"


# ----------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_ranks(model: SequenceRetriever, data: EvalSet, chunk: int = 256) -> torch.Tensor:
    """int64 ``[B]``: the full-corpus rank of each target (items scoring strictly higher), the query
    being the output at the history's last position (the next query); ``chunk`` users at a time."""
    return query_ranks(model, data, chunk)[:, 0]


@torch.no_grad()
def query_ranks(model: SequenceRetriever, data: EvalSet, chunk: int = 256, exclude_seen: bool = False) -> torch.Tensor:
    """int64 ``[B, 1 + T]``: :func:`evaluate_ranks` for each of the model's queries at the
    history's last position (column 0: next; then each task's); with ``exclude_seen``, the items
    of the user's timeline before the target (``data.seen_items``) other than the target itself
    are out of the ranking."""
    return protocol_ranks(model, data, chunk, (exclude_seen,))[0]


def protocol_ranks(
    model: SequenceRetriever, data: EvalSet, chunk: int, protocols: tuple[bool, ...]
) -> list[torch.Tensor]:
    """:func:`query_ranks` under each protocol of ``protocols`` (False: full corpus, True: seen
    items excluded), encoding each history once."""
    if any(protocols) and data.seen_items is None:
        raise ValueError("excluding seen items needs the held-out set's seen items (leave_last_out keeps them)")
    was_training = model.training
    model.eval()
    items = model.item_vectors()  # [N, D]
    out: list[list[torch.Tensor]] = [[] for _ in protocols]
    for s in range(0, len(data), chunk):
        rows = torch.arange(s, min(s + chunk, len(data)))
        h = data.history.rows(rows)
        request_ts = None if data.target_ts is None else data.target_ts[rows]
        heads = model.all_queries(model(h.items, h.ts, h.offsets, request_ts)[h.offsets[1:] - 1])  # [b, 1 + T, D]
        targets = data.targets[rows]
        scores = heads.transpose(0, 1) @ items.T  # [1 + T, b, N]
        for ranks, exclude in zip(out, protocols, strict=True):
            ranked = scores
            if exclude:
                index, offsets = jagged.gather_rows(data.seen_offsets, rows)
                user, _ = jagged.row_and_column(offsets)
                seen = data.seen_items[index]
                other = seen != targets[user]
                ranked = scores.clone()
                ranked[:, user[other], seen[other]] = float("-inf")
            ranks.append(torch.stack([target_ranks(head, targets) for head in ranked], 1))
    model.train(was_training)
    width = 1 + len(model.tasks)
    return [torch.cat(r) if r else torch.zeros(0, width, dtype=torch.int64) for r in out]


def task_metrics(ranks: torch.Tensor, target_actions: torch.Tensor, tasks: tuple[str, ...], k: int = 10) -> dict:
    """Per task ``t`` (bit ``j``) of :func:`query_ranks`' ``[B, 1 + T]``, over the targets with the
    bit: ``hr@k:t``, the HR@k of the task's query, and ``hr@k:t(next)``, the next query's (a task
    no target has is left out: checkpoint metadata holds no NaN)."""
    bits = task_bits(target_actions, len(tasks))
    out = {}
    for j, task in enumerate(tasks):
        has = bits[:, j]
        if not bool(has.any()):
            continue
        out[f"hr@{k}:{task}"] = hit_rate(ranks[has, 1 + j], k)
        out[f"hr@{k}:{task}(next)"] = hit_rate(ranks[has, 0], k)
    return out


def _evaluate(model: SequenceRetriever, data: EvalSet, cfg: RetrievalConfig) -> dict[str, float]:
    """:func:`ranking_metrics` of the next query at ``cfg.cutoffs``, and a multi-task model's
    :func:`task_metrics`; with ``cfg.exclude_seen`` the same again with seen items excluded, under
    keys prefixed ``unseen/``."""
    protocols = (False, True) if cfg.exclude_seen else (False,)
    out = {}
    for exclude, ranks in zip(protocols, protocol_ranks(model, data, cfg.eval_chunk, protocols), strict=True):
        metrics = ranking_metrics(ranks[:, 0], cfg.cutoffs)
        if model.tasks:
            metrics |= task_metrics(ranks, data.target_actions, model.tasks)
        out |= {(UNSEEN + k if exclude else k): v for k, v in metrics.items()}
    return out


def ranking_metrics(ranks: torch.Tensor, cutoffs: tuple[int, ...] = CUTOFFS) -> dict[str, float]:
    """HR@k and NDCG@k per cutoff and MRR of 0-based ranks ``[B]``."""
    out = {}
    for k in cutoffs:
        out[f"hr@{k}"] = hit_rate(ranks, k)
        out[f"ndcg@{k}"] = ndcg(ranks, k)
    out["mrr"] = float((1.0 / (ranks.double() + 1)).mean()) if ranks.numel() else float("nan")
    return out


def popularity_ranks(train: Sequences, data: EvalSet, num_items: int, exclude_seen: bool = False) -> torch.Tensor:
    """Ranks ``[B]`` under the most-popular baseline: items ordered by their count as a training
    target (ties broken by item row), the same list for every user; with ``exclude_seen``, the
    user's earlier items other than the target are out of the list (``data.seen_items``)."""
    anchor = trained_positions(train.offsets)
    counts = torch.bincount(train.items[anchor + 1], minlength=num_items).double()
    score = counts - torch.arange(num_items, dtype=torch.float64) / (2 * num_items)  # unique scores
    order = torch.argsort(score, descending=True)
    position = torch.empty(num_items, dtype=torch.int64)
    position[order] = torch.arange(num_items)
    ranks = position[data.targets]
    if not exclude_seen:
        return ranks
    if data.seen_items is None:
        raise ValueError("excluding seen items needs the held-out set's seen items (leave_last_out keeps them)")
    user, _ = jagged.row_and_column(data.seen_offsets)
    seen = torch.unique(user * num_items + data.seen_items)  # each (user, item) once
    user, item = seen // num_items, seen % num_items
    ahead = position[item] < ranks[user]  # a seen item above the target (never the target itself)
    return ranks - torch.bincount(user[ahead], minlength=len(ranks))


# ------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class RetrievalReport:
    """What a run produced.

    Attributes:
        config (RetrievalConfig): the run's configuration. data_dir (str): the dataset.
        num_items (int): catalogue size (every item is ranked). num_users (int): evaluated users.
        train_events (int): tokens of the training sequences (one epoch).
        steps (int), epochs (float): optimiser steps and passes done.
        train_s (float): wall time of the training loop (periodic validation included).
        valid, test (dict): HR@k, NDCG@k, MRR (keys ``hr@10`` … ``mrr``) of the reported model: the
            best epoch's when validation ran every epoch (``best_epoch``), else the last step's.
        popular_test (dict): the same for the most-popular baseline on the test targets.
        curve (list[dict]): per epoch: epoch, steps, mean loss, elapsed seconds, and ``valid``
            metrics every ``eval_every`` epochs (every epoch with a checkpoint directory or
            ``patience``).
        best_epoch (int | None): the epoch (1-based) with the best validation NDCG@10, when
            validation ran every epoch; None otherwise.
        tasks (tuple[str, ...]): a multi-task model's task names (their metrics are the
            ``hr@10:<task>`` keys of ``valid`` / ``test``); ``()`` for a single-task one.
        last_test (dict): the test metrics of the last epoch's model when it is not the reported
            one ({} when it is, or when no best was selected).
    """

    config: RetrievalConfig
    data_dir: str
    num_items: int
    num_users: int
    train_events: int
    steps: int
    epochs: float
    train_s: float
    valid: dict[str, float]
    test: dict[str, float]
    popular_test: dict[str, float]
    curve: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    last_test: dict[str, float] = field(default_factory=dict)
    tasks: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {**asdict(self), "config": asdict(self.config)}

    def write_json(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


def load_catalog_timelines(data_dir: Path) -> tuple[UserTimelines, np.ndarray]:
    """The users table of a request-format dataset and the catalogue's item ids (int64 ``[N]``,
    row order: ``items.parquet``'s)."""
    paths = DatasetPaths(Path(data_dir))
    item_ids, _, _ = read_items(paths.items)
    catalog = ItemCatalog(item_ids)
    return UserTimelines.read(paths.users, catalog), catalog.item_ids


def load_task_names(data_dir: Path) -> tuple[str, ...]:
    """The task names of a request-format dataset: its labels (``users.parquet``'s roles), label
    ``j`` being bit ``j`` of a timeline event's action."""
    path = DatasetPaths(Path(data_dir)).users
    return read_roles(pq.read_schema(path), str(path)).labels


def load_timelines(data_dir: Path) -> tuple[UserTimelines, int]:
    """The users table of a request-format dataset and the catalogue size."""
    timelines, item_ids = load_catalog_timelines(data_dir)
    return timelines, len(item_ids)


def lr_schedule(
    opt: torch.optim.Optimizer, warmup_steps: int, decay_steps: int | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate per optimiser step ``i`` (0-based; stepped once per step): a linear
    warm-up, ``lr · min(1, (i + 1) / (warmup_steps + 1))`` (``warmup_steps = 0``: none), then
    ``lr`` (``decay_steps`` None) or a cosine decay that reaches 0 at step ``decay_steps``:
    ``lr · (1 + cos(π · (i - w) / (decay_steps - w))) / 2`` from ``w = warmup_steps`` on."""

    def factor(i: int) -> float:
        warm = min(1.0, (i + 1) / (warmup_steps + 1))
        if decay_steps is None or i < warmup_steps:
            return warm
        progress = min(1.0, (i - warmup_steps) / max(1, decay_steps - warmup_steps))
        return warm * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


#: The validation metric that selects the best epoch and drives early stopping.
SELECT_BY = "ndcg@10"


def train_retrieval(
    data_dir: Path,
    cfg: RetrievalConfig = RetrievalConfig(),
    log: Callable[[str], None] = print,
    json_path: Path | None = None,
    out_dir: Path | None = None,
) -> RetrievalReport:
    """Train a :class:`SequenceRetriever` on the timelines of ``data_dir`` (sterling's request
    format: ``users.parquet`` + ``items.parquet``) and evaluate it on the leave-last-out targets.

    With ``out_dir`` or ``cfg.patience``, the model is validated after every epoch (``eval_every``
    is ignored) and the best validation NDCG@10 selects the reported model: its weights are
    restored before the final evaluation, so ``valid`` / ``test`` are the best epoch's
    (``best_epoch``; the last model's test metrics are ``last_test``). ``cfg.patience`` stops the
    run after that many validations in a row without improvement. ``out_dir`` receives two
    checkpoints (:func:`~sterling.train.sequence_checkpoint.write_sequence_checkpoint`):
    ``out_dir/best``, rewritten whenever validation improves, and ``out_dir/last``, written at the
    end; their meta holds ``data_dir``, ``epoch``, ``steps`` and ``metrics`` (``valid``, and
    ``test`` once the run is done).

    Args:
        data_dir (Path): the dataset.
        cfg (RetrievalConfig): the run.
        log (Callable[[str], None]): progress lines.
        json_path (Path | None): also write the report here.
        out_dir (Path | None): the checkpoint directory (None: no checkpoints).
    """
    torch.manual_seed(cfg.seed)
    timelines, item_ids = load_catalog_timelines(Path(data_dir))
    num_items = len(item_ids)
    tasks = load_task_names(Path(data_dir)) if cfg.multi_task else ()
    if cfg.multi_task and not tasks:
        raise ValueError(f"{data_dir}: multi-task training needs the dataset's labels; users.parquet names none")
    actions = timelines.actions if cfg.multi_task else None
    split = leave_last_out(
        timelines.offsets,
        timelines.item_rows,
        timelines.ts,
        cfg.max_len,
        actions,
        cfg.holdout,
        cfg.tie_order,
        cfg.train_events,
    )
    model = SequenceRetriever(num_items, cfg, tasks)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(cfg.seed)
    train = split.train
    if len(train) == 0:
        raise ValueError(f"{data_dir}: no user has two events to train on")
    per_epoch = math.ceil(len(train) / cfg.batch_size)
    planned = cfg.epochs * per_epoch if cfg.max_steps is None else min(cfg.epochs * per_epoch, cfg.max_steps)
    schedule = lr_schedule(opt, cfg.warmup_steps, planned if cfg.lr_decay == "cosine" else None)
    loss_kind = cfg.resolved_loss(num_items)
    log_q = None
    if loss_kind == "sampled":
        targets = train.items[trained_positions(train.offsets) + 1]
        positions = targets.numel() / per_epoch  # trained positions per batch, on average
        log_q = candidate_log_q(torch.bincount(targets, minlength=num_items), positions, cfg.num_negatives)
    # holdout 1 trains on the validation targets: nothing is validated or selected
    validated = cfg.holdout == 2
    every_epoch = validated and (out_dir is not None or cfg.patience is not None)
    if every_epoch and len(split.valid) == 0:
        raise ValueError(f"{data_dir}: no user has three events to validate on (needed by checkpoints and patience)")
    data_dir_txt = str(Path(data_dir).resolve())
    log(
        f"retrieval ({cfg.encoder}): {num_items:,} items, {len(train):,} training sequences "
        f"({int(train.offsets[-1]):,} events), {len(split.test):,} evaluated users; "
        + (
            f"full softmax over {num_items:,} items"
            if log_q is None
            else f"sampled softmax, {cfg.num_negatives} negatives, logQ"
        )
        + f"; {torch.get_num_threads()} threads"
        + ("" if validated else "; holdout 1: trained on the validation targets, the last epoch reported")
        + (f"; tasks next + {', '.join(tasks)}" if tasks else "")
    )

    def save(name: str, epoch: int, at_step: int, metrics: dict) -> Path:
        run = {"data_dir": data_dir_txt, "epoch": epoch, "steps": at_step, "metrics": metrics}
        return write_sequence_checkpoint(Path(out_dir) / name, model, item_ids, run)

    steps, curve, t0 = 0, [], time.perf_counter()
    epochs_done = 0.0
    done = cfg.max_steps is not None and cfg.max_steps <= 0
    best: dict | None = None  # epoch, steps, valid, state (a copy of the weights)
    stale = 0  # validations in a row without improvement
    for epoch in range(cfg.epochs):
        if done:
            break
        model.train()
        order = torch.randperm(len(train), generator=gen)
        total = 0.0
        bar = progress_bar(per_epoch, f"epoch {epoch + 1}/{cfg.epochs}")
        for i, s in enumerate(range(0, len(train), cfg.batch_size)):  # noqa: B007 (i is read after the loop)
            batch = train.rows(order[s : s + cfg.batch_size])
            negatives = None if log_q is None else torch.randint(num_items, (cfg.num_negatives,), generator=gen)
            loss = batch_loss(model, batch, negatives, log_q)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            steps, total = steps + 1, total + loss.item()
            bar.update()
            bar.set_postfix(loss=f"{total / (i + 1):.4f}", refresh=False)
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                done = True
                break
        bar.close()
        epochs_done = epoch + (i + 1) / per_epoch
        elapsed = time.perf_counter() - t0
        point = {"epoch": round(epochs_done, 3), "steps": steps, "loss": total / (i + 1), "train_s": elapsed}
        periodic = (
            validated and cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs and not done
        )
        if every_epoch or periodic:
            point["valid"] = _evaluate(model, split.valid, cfg)
        curve.append(point)
        valid = point.get("valid", {})
        valid_txt = "".join(f", valid {k.upper()} {valid[k]:.4f}" for k in ("hr@10", "ndcg@10") if k in valid)
        note = ""
        if every_epoch:
            if best is None or valid[SELECT_BY] > best["valid"][SELECT_BY]:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best, stale = {"epoch": epoch + 1, "steps": steps, "valid": valid, "state": state}, 0
                note = " (best)"
                if out_dir is not None:
                    save("best", epoch + 1, steps, {"valid": valid})
            else:
                stale += 1
                note = f" (best: epoch {best['epoch']})"
        log(
            f"  epoch {epoch + 1}/{cfg.epochs}: loss {point['loss']:.4f}, {steps} steps, {elapsed:.1f}s{valid_txt}{note}"
        )
        if cfg.patience is not None and stale >= cfg.patience and epoch + 1 < cfg.epochs and not done:
            log(
                f"  early stop: no better validation {SELECT_BY.upper()} in {stale} epochs "
                f"(patience {cfg.patience}; best: epoch {best['epoch']})"
            )
            break
    train_s = time.perf_counter() - t0
    last_epoch = len(curve)

    # the last model
    last_valid = curve[-1]["valid"] if every_epoch and curve else None
    if last_valid is None:
        last_valid = _evaluate(model, split.valid, cfg) if validated else {}
    last_test = _evaluate(model, split.test, cfg)
    if out_dir is not None:
        path = save("last", last_epoch, steps, {"valid": last_valid, "test": last_test})
        log(f"  wrote the last model (epoch {last_epoch}) to {path}")
    # the reported model: the best epoch's when there is one
    valid, test, best_epoch = last_valid, last_test, None
    if best is not None:
        best_epoch = best["epoch"]
        if best_epoch != last_epoch:
            model.load_state_dict(best["state"])
            valid, test = best["valid"], _evaluate(model, split.test, cfg)
        else:
            last_test = {}
        if out_dir is not None:  # the final metrics beside the same weights
            path = save("best", best_epoch, best["steps"], {"valid": valid, "test": test})
            log(f"  best validation {SELECT_BY.upper()}: epoch {best_epoch} of {last_epoch}; wrote {path}")
        else:
            log(f"  best validation {SELECT_BY.upper()}: epoch {best_epoch} of {last_epoch} (the reported model)")
    else:
        last_test = {}
        if out_dir is not None and not validated:  # holdout 1: the reported model is the last one
            path = save("best", last_epoch, steps, {"valid": valid, "test": test})
            log(f"  no held-out validation (holdout 1): the reported model is the last; wrote {path}")
    popular = ranking_metrics(popularity_ranks(train, split.test, num_items), cfg.cutoffs)
    if cfg.exclude_seen:
        unseen = ranking_metrics(popularity_ranks(train, split.test, num_items, exclude_seen=True), cfg.cutoffs)
        popular |= {UNSEEN + k: v for k, v in unseen.items()}
    report = RetrievalReport(
        config=cfg,
        data_dir=data_dir_txt,
        num_items=num_items,
        num_users=len(split.test),
        train_events=int(train.offsets[-1]),
        steps=steps,
        epochs=round(epochs_done, 3),
        train_s=train_s,
        valid=valid,
        test=test,
        popular_test=popular,
        curve=curve,
        best_epoch=best_epoch,
        last_test=last_test,
        tasks=tasks,
    )
    label = "" if best_epoch is None else f" (epoch {best_epoch})"
    for name, metrics in ((f"valid{label}", valid), (f"test{label}", test), ("popular (test)", popular)):
        if not metrics:
            continue
        log(f"  {name}: " + ", ".join(f"{k.upper()} {v:.4f}" for k, v in metrics.items()))
    if json_path is not None:
        log(f"  wrote {report.write_json(json_path)}")
    return report
