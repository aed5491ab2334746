"""A sequential encoder (HSTU or SASRec) as the served user tower.

The next-item retriever of :mod:`sterling.train.sequence_model` embeds a user's timeline as tokens
``√D · E[item]``, encodes them causally, and takes the L2-normalised output at the **last** event
as the query for the next item; items are scored by the inner product with their L2-normalised
embeddings ``Ê``. Served, the same computation reads the history's ``E`` rows from the item table
(the served model's cache, by the index's rows) and the index holds ``Ê``::

    history embeddings E[h]                         [L, D]   jagged, B requests (no padding)
      → tokens √D · E[h]                            [L, D]
      → encoder (causal mask, no candidates)        [L, D]   HSTU: relative position + time bias
      → the output at each history's last event     [B, D]
      → L2 normalise                                [B, D]   the user embedding (one query)

It has the signature of :class:`~sterling.models.towers.UserTower` (plus optional timestamps), so
:class:`~sterling.retrieval.model.RetrievalModel` composes either. A request without history gets
the zero vector (every item scores 0). Actions and features are not read: the retriever trains
on item sequences alone. Timestamps (int64 seconds ``[L]``) feed HSTU's time bias; without them
every gap is 0. A tower trained with ``query_time = "request"`` (the retriever's default) reads a
position's time as the next event's and the last position's as the request's (``request_ts [B]``;
without it, the last event's), as in training.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sterling.models import jagged
from sterling.models.ranker import make_encoder

__all__ = ["QUERY_TIMES", "SequenceTowerConfig", "SequenceUserTower", "query_timestamps"]

ENCODERS = ("hstu", "sasrec")
#: A query's time for HSTU's time bias: the ``request`` it answers (the next event's time; GR's) or
#: its own last ``event``'s.
QUERY_TIMES = ("request", "event")


def query_timestamps(
    query_time: str, ts: torch.Tensor, offsets: torch.Tensor, request_ts: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Each position's time as a query (int64 ``[L]`` of jagged ``ts [L]``, offsets ``[B + 1]``) for
    HSTU's time bias: with ``"request"``, the next event's time and, at a sequence's last position,
    its request's (``request_ts [B]``; None: the last event's own); with ``"event"``, None (each
    position's own time). The one rule training, evaluation and serving share."""
    return jagged.next_values(ts, offsets, request_ts) if query_time == "request" else None


@dataclass(frozen=True)
class SequenceTowerConfig:
    """Sizes of a served sequence tower (those of the retriever it was trained as).

    Args:
        encoder (str): ``"hstu"`` or ``"sasrec"``.
        dim (int): token and embedding width ``D``.
        num_layers (int), num_heads (int): encoder depth and heads.
        max_len (int): most recent events read (the encoder's positions are ``max_len + 1``).
        query_time (str): the retriever's ``RetrievalConfig.query_time``: ``"request"`` or
            ``"event"`` (snapshots published before the option).
    """

    encoder: str
    dim: int
    num_layers: int
    num_heads: int
    max_len: int
    query_time: str = "event"

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.query_time not in QUERY_TIMES:
            raise ValueError(f"query_time must be one of {QUERY_TIMES}, got {self.query_time!r}")
        if min(self.dim, self.num_layers, self.num_heads, self.max_len) < 1:
            raise ValueError(f"dim, num_layers, num_heads and max_len must be >= 1, got {self}")

    @property
    def context_features(self) -> tuple[str, ...]:
        return ()

    @property
    def user_features(self) -> tuple[str, ...]:
        return ()

    @property
    def max_history(self) -> int:
        return self.max_len

    def to_json(self) -> dict:
        return asdict(self)


class SequenceUserTower(nn.Module):
    """history item embeddings ``[L, D]`` (jagged, offsets ``[B + 1]``) → user embeddings ``[B, D]``.

    Args:
        cfg (SequenceTowerConfig): sizes.

    Example::

        tower = SequenceUserTower(SequenceTowerConfig("hstu", 16, 2, 1, 50))
        users = tower(torch.randn(7, 16), torch.ones(7, dtype=torch.int64), torch.tensor([0, 4, 7]), {})  # [2, 16]
    """

    def __init__(self, cfg: SequenceTowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = make_encoder(cfg.encoder, cfg.dim, cfg.num_layers, cfg.num_heads, cfg.max_len + 1, 0.0)

    def forward(
        self,
        history_vectors: torch.Tensor,
        history_actions: torch.Tensor,
        history_offsets: torch.Tensor,
        features: dict[str, torch.Tensor],
        timestamps: torch.Tensor | None = None,
        request_ts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, total = history_offsets.shape[0] - 1, history_vectors.shape[0]
        ts = torch.zeros_like(history_actions) if timestamps is None else timestamps  # [L]
        query_ts = query_timestamps(self.cfg.query_time, ts, history_offsets, request_ts)
        tokens = history_vectors * math.sqrt(self.cfg.dim)  # [L, D]
        width = self.cfg.max_len if torch.compiler.is_compiling() else None  # static under torch.export
        none = torch.zeros(b, dtype=torch.int64)
        out = self.encoder(tokens, history_offsets, ts, none, width, query_timestamps=query_ts)  # [L, D]
        out = torch.cat([F.normalize(out, dim=-1), out.new_zeros(1, out.shape[1])])  # [L + 1, D]: a zero row
        has_history = history_offsets[1:] > history_offsets[:-1]  # [B]
        return out[torch.where(has_history, history_offsets[1:] - 1, total)]  # [B, D]; no history → 0

    def index_vectors(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The index's vectors of item embeddings ``E [M, D]``: L2-normalised (the retriever scores
        by cosine)."""
        return F.normalize(embeddings.float(), dim=-1)
