"""The next-item model that retrieval training (:mod:`sterling.train.retrieval`) fits, and its
configuration: HSTU or SASRec over item-id embeddings (HSTU paper §4.1.1, spec ``roo.md`` §7.2).

**Model** (:class:`SequenceRetriever`). One item-id embedding table ``E [N, D]``. A user's timeline
(item rows, oldest first, at most ``max_len`` events) becomes tokens ``√D · E[item]`` (dropout);
the user tower (:func:`~sterling.models.ranker.make_encoder`: HSTU or SASRec, ``num_targets = 0``,
so the mask is plain causal) encodes them, and the output at every position, L2-normalised, is a
query for the **next** item. Items are scored by the inner product with their L2-normalised
embeddings (cosine), divided by ``temperature`` in the loss. The same table embeds the inputs and
the outputs, as in GR. HSTU's relative time bias reads the gap from a query's time to each earlier
event's timestamp; a query's time (``RetrievalConfig.query_time``) is by default that of the
**request** it answers, as in GR: in training the next event's timestamp, in evaluation the
target's, served the request's (``"event"``: the query's own last event, as checkpoints written
before the option did). Batches are jagged (values + offsets); only the encoder's attention pads,
each group of :data:`LENGTH_GROUP` sequences of similar length to its own longest::

    items, ts                       int64 [L]      jagged, offsets [B + 1]
      → tokens √D · E[items]        [L, D]         dropout
      → encoder (causal)            [L, D]         HSTU: time bias from ts[i + 1] (the request's) − ts[j]
      → L2 normalise                [L, D]         position i: the query for event i + 1

**Multi-task** (``RetrievalConfig.multi_task``, the model built with the dataset's task names, e.g.
``("click", "like", "share")``): a :class:`~sterling.models.towers.TaskQueries` over that output
(one zero-initialised residual per task, L2-normalised) gives one more query per task and
position, ``[L, T, D]``, trained on the next events that carry the task's action bit. The plain
output stays the **next** query (:data:`NEXT`, not one of the T heads): ``all_queries`` is
``[L, 1 + T, D]``, ``next`` first, the order the served model's task queries take.

Saved and loaded by :mod:`sterling.train.sequence_checkpoint`; served as the user tower of
:mod:`sterling.models.sequence_tower`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sterling.models import jagged
from sterling.models.ranker import make_encoder
from sterling.models.sequence_tower import QUERY_TIMES, query_timestamps
from sterling.models.towers import TaskQueries
from sterling.train.sequence_split import TIE_ORDERS, TRAIN_EVENTS

__all__ = ["ENCODERS", "LOSSES", "LR_DECAYS", "NEXT", "QUERY_TIMES", "RetrievalConfig", "SequenceRetriever"]

ENCODERS = ("hstu", "sasrec")
#: ``full``: softmax over the whole catalogue; ``sampled``: in-batch targets + shared negatives
#: with the logQ correction; ``auto``: full when one step's logits fit :data:`FULL_SOFTMAX_LOGITS`.
LOSSES = ("auto", "full", "sampled")
#: Learning rate after the warm-up: ``constant``, or ``cosine`` decay to 0 at the last planned step.
LR_DECAYS = ("constant", "cosine")
#: The most logits (positions x items) one step of ``loss="auto"`` computes over the whole
#: catalogue: 2**28 floats, 1 GiB (128 users x 200 events x 10,485 items).
FULL_SOFTMAX_LOGITS = 1 << 28
#: Sequences per padded group of :meth:`SequenceRetriever.forward`'s encoder (by length).
LENGTH_GROUP = 16
#: The name of the plain next-item query (the encoder's output itself).
NEXT = "next"


@dataclass(frozen=True)
class RetrievalConfig:
    """One retrieval training run (defaults: GR's ML-1M configuration, spec ``roo.md`` §7.2).

    Args:
        encoder (str): user tower, ``"hstu"`` or ``"sasrec"``.
        dim (int): item embedding and token width ``D`` (50).
        num_layers (int): encoder layers / blocks (2).
        num_heads (int): attention heads (1).
        max_len (int): most recent events per sequence, in training and evaluation (200).
        dropout (float): on the input tokens and inside the encoder (0.2).
        epochs (int): passes over the training sequences.
        batch_size (int): sequences (users) per step (128).
        lr (float): Adam learning rate (1e-3; betas 0.9, 0.98 as GR; no weight decay).
        loss (str): ``"full"`` softmax over the catalogue, ``"sampled"`` softmax (in-batch
            targets + ``num_negatives`` uniform items, same-user items masked, logQ-corrected),
            or ``"auto"``: full when ``batch_size * max_len * N <= FULL_SOFTMAX_LOGITS``
            (:meth:`resolved_loss`).
        num_negatives (int): uniform random items added to a sampled softmax's candidates (512).
        temperature (float): softmax temperature of the cosine logits (0.05).
        warmup_steps (int): steps of linear learning-rate warm-up from 0 to ``lr`` (0: none).
        lr_decay (str): after the warm-up, ``"constant"`` or ``"cosine"`` (to 0 at the last
            planned step: ``epochs`` epochs, or ``max_steps``).
        holdout (int): events at the end of each evaluated timeline kept out of training: 2 (the
            validation and the test target) or 1 (GR's protocol: train on all but the test
            target; there is no held-out validation, so nothing is selected by it: no
            ``patience``, and the reported model is the last one).
        cutoffs (tuple[int, ...]): the k of the reported HR@k / NDCG@k (10 is always reported:
            it selects the best epoch).
        exclude_seen (bool): also evaluate with the user's earlier items removed from the
            ranking (keys ``unseen/hr@10`` …, beside the full-corpus ones).
        eval_every (int): validate every this many epochs (0: only after training). Ignored when
            validation runs every epoch (a checkpoint directory or ``patience``).
        eval_chunk (int): users per evaluation chunk (bounds the ``[chunk, N]`` score matrix).
        seed (int): seed of the parameters, the shuffling and the negatives.
        max_steps (int | None): stop after this many steps (smoke runs).
        patience (int | None): stop after this many validations in a row without a better
            validation NDCG@10 (validates every epoch; None: run every epoch).
        multi_task (bool): also train one task query per task of the dataset (its labels: action
            bit ``j`` is task ``j``) beside the next query (module docstring).
        query_time (str): the time HSTU's time bias measures a query's gaps from: ``"request"``
            (GR's: the time of the request the query answers, i.e. of the next event) or
            ``"event"`` (the query's own last event). SASRec reads no time.
        tie_order (str): a user's events of the same second in training and evaluation:
            ``"shuffled"`` (by a fixed hash of user and item,
            :func:`~sterling.train.sequence_split.shuffled_ties`) or ``"stored"`` (by item id, the
            data format's order, which a model learns to exploit; runs before the option).
        train_events (str): the events of a timeline trained on: ``"latest"`` (its most recent
            ``max_len``, GR's) or ``"all"`` (the earlier ones too, in windows of ``max_len``, each
            event a next-item target once: :func:`~sterling.train.sequence_split.earlier_windows`).
    """

    encoder: str = "hstu"
    dim: int = 50
    num_layers: int = 2
    num_heads: int = 1
    max_len: int = 200
    dropout: float = 0.2
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    loss: str = "auto"
    num_negatives: int = 512
    temperature: float = 0.05
    warmup_steps: int = 0
    lr_decay: str = "constant"
    holdout: int = 2
    cutoffs: tuple[int, ...] = (10, 50)
    exclude_seen: bool = False
    eval_every: int = 0
    eval_chunk: int = 256
    seed: int = 0
    max_steps: int | None = None
    patience: int | None = None
    multi_task: bool = False
    query_time: str = "request"
    tie_order: str = "shuffled"
    train_events: str = "latest"

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if min(self.dim, self.num_layers, self.num_heads, self.max_len, self.batch_size, self.eval_chunk) < 1:
            raise ValueError("dim, num_layers, num_heads, max_len, batch_size and eval_chunk must be positive")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of num_heads {self.num_heads}")
        if self.max_len < 2:
            raise ValueError("max_len must be at least 2 (an input and its next item)")
        if self.num_negatives < 0 or self.epochs < 0 or self.eval_every < 0 or self.temperature <= 0:
            raise ValueError("num_negatives, epochs and eval_every must be >= 0 and temperature > 0")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {LR_DECAYS}, got {self.lr_decay!r}")
        if self.query_time not in QUERY_TIMES:
            raise ValueError(f"query_time must be one of {QUERY_TIMES}, got {self.query_time!r}")
        if self.tie_order not in TIE_ORDERS:
            raise ValueError(f"tie_order must be one of {TIE_ORDERS}, got {self.tie_order!r}")
        if self.train_events not in TRAIN_EVENTS:
            raise ValueError(f"train_events must be one of {TRAIN_EVENTS}, got {self.train_events!r}")
        if self.holdout not in (1, 2):
            raise ValueError(f"holdout must be 1 or 2, got {self.holdout}")
        if self.holdout == 1 and self.patience is not None:
            raise ValueError("patience selects epochs by validation, and holdout 1 trains on the validation targets")
        cutoffs = tuple(self.cutoffs)
        if not cutoffs or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in cutoffs):
            raise ValueError(f"cutoffs must be ints >= 1, got {self.cutoffs!r}")
        object.__setattr__(self, "cutoffs", tuple(sorted(set(cutoffs) | {10})))

    def resolved_loss(self, num_items: int) -> str:
        """``"full"`` or ``"sampled"``: :attr:`loss`, with ``"auto"`` decided by the logits one
        step would hold over ``num_items`` items."""
        if self.loss != "auto":
            return self.loss
        return "full" if self.batch_size * self.max_len * num_items <= FULL_SOFTMAX_LOGITS else "sampled"


class SequenceRetriever(nn.Module):
    """Item-id embeddings and a sequential user tower; every position's output is a next-item query.

    Args:
        num_items (int): rows of the item table (the catalogue).
        cfg (RetrievalConfig): sizes.
        tasks (tuple[str, ...]): the task names of a multi-task model (``cfg.multi_task``; task
            ``j`` is action bit ``j``), in head order; ``()`` for a single-task one.

    Example::

        model = SequenceRetriever(1000, RetrievalConfig(encoder="sasrec", dim=16))
        q = model(items, ts, offsets)            # [L, 16], unit norm
        scores = q @ model.item_vectors().T      # [L, 1000]
        heads = model.all_queries(q)             # [L, 1 + T, 16]: next, then each task's query
    """

    def __init__(self, num_items: int, cfg: RetrievalConfig, tasks: tuple[str, ...] = ()) -> None:
        super().__init__()
        tasks = tuple(tasks)
        if cfg.multi_task != bool(tasks):
            raise ValueError(
                f"a multi-task retriever needs task names and a single-task one none (multi_task={cfg.multi_task}, "
                f"tasks={tasks})"
            )
        if len(set(tasks)) != len(tasks) or NEXT in tasks or len(tasks) > 8:
            raise ValueError(f"tasks must be at most 8 distinct names other than {NEXT!r}, got {tasks}")
        self.cfg = cfg
        self.num_items = num_items
        self.tasks = tasks
        self.item_table = nn.Embedding(num_items, cfg.dim)
        nn.init.normal_(self.item_table.weight, std=0.02)
        self.input_dropout = nn.Dropout(cfg.dropout)
        # max_len + 1: SASRec's recencies run 1..max_len, HSTU's relative positions 0..max_len-1.
        self.encoder = make_encoder(cfg.encoder, cfg.dim, cfg.num_layers, cfg.num_heads, cfg.max_len + 1, cfg.dropout)
        # only a multi-task model has the module: a single-task state_dict is unchanged
        self.task_queries = TaskQueries(cfg.dim, len(tasks)) if tasks else None

    @property
    def query_names(self) -> tuple[str, ...]:
        """The names of :meth:`all_queries`' heads: ``("next", *tasks)``."""
        return (NEXT, *self.tasks)

    def item_vectors(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised item embeddings ``[n, D]`` of ``rows`` (default: the whole catalogue)."""
        weight = self.item_table.weight if rows is None else self.item_table(rows)
        return F.normalize(weight, dim=-1)

    def forward(
        self, items: torch.Tensor, ts: torch.Tensor, offsets: torch.Tensor, request_ts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Unit-norm queries ``[L, D]`` of the jagged sequences ``items``, ``ts`` (int64 ``[L]``,
        offsets ``[B + 1]``): position ``i`` of a sequence encodes its events ``<= i``. With
        ``query_time = "request"``, position ``i``'s time is event ``i + 1``'s and a sequence's
        last position's is ``request_ts [B]`` (the time its next item is asked for; None: its own
        event's)."""
        x = self.input_dropout(self.item_table(items) * math.sqrt(self.cfg.dim))
        query_ts = query_timestamps(self.cfg.query_time, ts, offsets, request_ts)
        return F.normalize(self._encode_by_length(x, ts, offsets, query_ts), dim=-1)

    def _encode_by_length(
        self, x: torch.Tensor, ts: torch.Tensor, offsets: torch.Tensor, query_ts: torch.Tensor | None
    ) -> torch.Tensor:
        """The encoder's output ``[L, D]`` of the jagged tokens ``x [L, D]`` (offsets ``[B + 1]``),
        run over groups of :data:`LENGTH_GROUP` sequences of similar length, each padded only to
        its own longest: sequences never attend to each other, so the output is the encoder's over
        the whole batch, with less of the attention's ``[B, n, n]`` work spent on padding."""
        out = torch.empty_like(x)  # [L, D], each group's tokens written back in place
        for rows in torch.argsort(jagged.lengths(offsets)).split(LENGTH_GROUP):
            index, group_offsets = jagged.gather_rows(offsets, rows)
            q = None if query_ts is None else query_ts[index]
            out[index] = self.encoder(x[index], group_offsets, ts[index], torch.zeros_like(rows), query_timestamps=q)
        return out

    def all_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """Unit-norm queries ``[L, 1 + T, D]`` of :meth:`forward`'s ``[L, D]``: the next query
        itself, then each task's (``T = 0`` for a single-task model)."""
        if self.task_queries is None:
            return queries[:, None, :]
        return torch.cat([queries[:, None, :], self.task_queries(queries)], 1)
