"""The sequential multi-task ranker, trained request-only (ROO) or per impression: one model,
two ways of laying out the same computation.

Tokens (``D`` wide): a history event is ``E_item[item] + E_action[action bitmask]``; a candidate is
``E_item[item] + E_action[TARGET] + E_position[served position]``: a learned "to be predicted"
action, so a candidate carries no label information, and its own slot in the served list (an
impression feature known at serving time; position bias is most of what a short training run can
learn). The user tower (:class:`~sterling.models.hstu.HSTU` or
:class:`~sterling.models.sasrec.SASRec`) encodes each sequence with the target-aware mask, and the
multi-task head maps ``[out ‖ out ⊙ E_item[candidate]]`` through an MLP to one logit per task.

* ``mode="roo"``: one sequence per **request**, ``[history ‖ its k impressions]`` with
  ``num_targets = k``: the history is embedded and encoded once and shared by the k candidates.
* ``mode="impression"``: one sequence per **impression**, ``[history ‖ that impression]`` with
  ``num_targets = 1``: the conventional layout, the history copied and re-encoded k times.

Under the target-aware mask a candidate's output depends on the history and on itself only, and
the attention normaliser is a constant, so both modes give the same predictions (and, with the
loss averaged per impression, the same gradients) with the same parameters; ``tests/models/
test_ranker.py`` checks it. Shapes: ``R`` requests, ``L`` history events, ``K`` impressions,
``T`` tasks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from sterling.data.batch import RequestBatch
from sterling.models import jagged
from sterling.models.hstu import HSTU, HSTUConfig
from sterling.models.sasrec import SASRec, SASRecConfig

__all__ = ["MODES", "RankerConfig", "SequenceRanker"]

MODES = ("roo", "impression")


@dataclass(frozen=True)
class RankerConfig:
    """Sizes of the sequential ranker.

    Args:
        num_items (int): rows of the item table.
        tasks (tuple[str, ...]): one logit per task.
        encoder (str): ``"hstu"`` or ``"sasrec"``.
        dim (int): token width. num_layers (int), num_heads (int): encoder depth and heads.
        norm_len (int): HSTU's constant attention normaliser / position range (history + candidates).
        num_actions (int): action bitmask values embedded (larger values are clamped); one more row
            is the candidates' TARGET action.
        num_positions (int): served positions embedded (later ones share the last).
        dropout (float): encoder dropout.
    """

    num_items: int
    tasks: tuple[str, ...]
    encoder: str = "hstu"
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 1
    norm_len: int = 256
    num_actions: int = 16
    num_positions: int = 64
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.encoder not in ("hstu", "sasrec"):
            raise ValueError(f"encoder must be 'hstu' or 'sasrec', got {self.encoder!r}")
        if not self.tasks:
            raise ValueError("a ranker needs at least one task")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> RankerConfig:
        return cls(**{**d, "tasks": tuple(d["tasks"])})


def make_encoder(encoder: str, dim: int, num_layers: int, num_heads: int, norm_len: int, dropout: float) -> nn.Module:
    """An :class:`HSTU` or :class:`SASRec` user tower with the shared jagged interface."""
    if encoder == "hstu":
        head = dim // num_heads
        return HSTU(
            HSTUConfig(
                dim=dim,
                num_layers=num_layers,
                num_heads=num_heads,
                attention_dim=head,
                value_dim=head,
                norm_len=norm_len,
                dropout=dropout,
            )
        )
    return SASRec(SASRecConfig(dim=dim, num_layers=num_layers, num_heads=num_heads, max_len=norm_len, dropout=dropout))


class SequenceRanker(nn.Module):
    """Item and action embeddings, a sequence user tower and multi-task heads.

    Example::

        model = SequenceRanker(RankerConfig(num_items=100, tasks=("click", "like")))
        logits = model(batch, mode="roo")          # [K, 2], one row per impression of the batch
    """

    def __init__(self, cfg: RankerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.items = nn.Embedding(cfg.num_items, cfg.dim)
        self.actions = nn.Embedding(cfg.num_actions + 1, cfg.dim)  # last row: TARGET
        self.positions = nn.Embedding(cfg.num_positions, cfg.dim)
        for table in (self.items, self.actions, self.positions):
            nn.init.normal_(table.weight, std=0.02)
        self.encoder = make_encoder(cfg.encoder, cfg.dim, cfg.num_layers, cfg.num_heads, cfg.norm_len, cfg.dropout)
        self.head = nn.Sequential(
            nn.Linear(2 * cfg.dim, 2 * cfg.dim), nn.SiLU(), nn.Linear(2 * cfg.dim, len(cfg.tasks))
        )

    def history_tokens(self, batch: RequestBatch) -> torch.Tensor:
        """``[L, D]``: the batch's history events as tokens."""
        return self.event_tokens(self.items(batch.history_items), batch.history_actions)

    def candidate_tokens(self, batch: RequestBatch) -> torch.Tensor:
        """``[K, D]``: the impressions as candidate tokens (TARGET action: no labels)."""
        return self.target_tokens(self.items(batch.item_rows), batch.positions)

    def event_tokens(self, items: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``[L, D]``: history events of item embeddings ``[L, D]`` and action bitmasks ``[L]``."""
        return items + self.actions(actions.clamp(0, self.cfg.num_actions - 1))

    def target_tokens(self, items: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``[K, D]``: candidates of item embeddings ``[K, D]`` at served ``positions [K]``."""
        position = self.positions(positions.clamp(0, self.cfg.num_positions - 1))
        return items + self.actions.weight[self.cfg.num_actions] + position

    def task_logits(self, encoded: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Per-task logits ``[K, T]`` of encoded candidates ``[K, D]`` and their item embeddings."""
        return self.head(torch.cat([encoded, encoded * items], -1))

    def forward(self, batch: RequestBatch, mode: str = "roo") -> torch.Tensor:
        """Per-task logits ``[K, T]`` of the batch's impressions, in batch order."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        history = self.history_tokens(batch)  # [L, D]
        candidates = self.candidate_tokens(batch)  # [K, D]
        if mode == "roo":
            h_offsets, c_offsets = batch.history_offsets, batch.impression_offsets
            h_ts = batch.history_ts
            c_ts = batch.ts[batch.impression_to_request()]
            num_targets = jagged.lengths(c_offsets)  # [R]
        else:  # one sequence per impression: its request's history, copied
            owner = batch.impression_to_request()  # [K]
            index, h_offsets = jagged.gather_rows(batch.history_offsets, owner)
            history, h_ts = history[index], batch.history_ts[index]  # [K·L/R, D]
            c_offsets = torch.arange(batch.num_impressions + 1)
            c_ts = batch.ts[owner]
            num_targets = torch.ones(batch.num_impressions, dtype=torch.int64)  # [K]
        tokens, offsets, at = jagged.concat(history, h_offsets, candidates, c_offsets)
        timestamps, _, _ = jagged.concat(h_ts, h_offsets, c_ts, c_offsets)
        out = self.encoder(tokens, offsets, timestamps, num_targets)[at]  # [K, D]
        return self.task_logits(out, self.items(batch.item_rows))  # [K, T]

    @torch.no_grad()
    def score_candidates(
        self,
        history_items: torch.Tensor,
        history_actions: torch.Tensor,
        history_offsets: torch.Tensor,
        history_ts: torch.Tensor,
        candidate_items: torch.Tensor,
        candidate_offsets: torch.Tensor,
        candidate_ts: torch.Tensor,
        positions: torch.Tensor | None = None,
        chunk: int = 256,
    ) -> torch.Tensor:
        """Per-task logits ``[C, T]`` of ``B`` requests' candidates, the served ranking stage: item
        embeddings are given (the served model's cache), not looked up. History: embeddings ``[L,
        D]``, actions, seconds ``[L]``, offsets ``[B + 1]``; candidates: embeddings ``[C, D]``,
        offsets ``[B + 1]``, seconds ``[C]`` and served ``positions [C]`` (default 0: a retrieved
        candidate has no slot yet). HSTU scores them with M-FALCON
        (:meth:`~sterling.models.hstu.HSTU.encode_candidates`: the history's keys and values once,
        ``chunk`` candidates at a time); SASRec in one target-aware pass. Either equals
        :meth:`forward` in ``roo`` mode on the same inputs."""
        history = self.event_tokens(history_items, history_actions)  # [L, D]
        if positions is None:
            positions = torch.zeros(candidate_items.shape[0], dtype=torch.int64)
        candidates = self.target_tokens(candidate_items, positions)  # [C, D]
        if isinstance(self.encoder, HSTU):
            out = self.encoder.encode_candidates(
                history, history_offsets, history_ts, candidates, candidate_offsets, candidate_ts, chunk
            )
        else:
            tokens, offsets, at = jagged.concat(history, history_offsets, candidates, candidate_offsets)
            timestamps, _, _ = jagged.concat(history_ts, history_offsets, candidate_ts, candidate_offsets)
            out = self.encoder(tokens, offsets, timestamps, jagged.lengths(candidate_offsets))[at]
        return self.task_logits(out, candidate_items)  # [C, T]
