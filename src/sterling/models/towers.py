"""The thin two-tower retrieval model: a user tower over the request's history, an item tower over
item id + attributes, and multi-task heads over their interaction.

Shapes use ``R`` requests, ``L`` history events (jagged, all requests), ``N`` items, ``M`` items
scored at once, ``D`` the embedding width and ``T`` tasks (labels).

The item tower depends on item-side inputs only, so its outputs can be computed once per catalogue
(the embeddings the index holds). The user tower runs once per request, however many impressions
the request has: the request-only (ROO) unit of user-side computation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ItemTerms", "TaskQueries", "TwoTower", "TwoTowerConfig", "UserTower"]


@dataclass(frozen=True)
class TwoTowerConfig:
    """Sizes of the two-tower model.

    Args:
        num_items (int): catalogue size ``N`` (rows of the item id table).
        num_terms (int): attribute vocabulary size (one term per ``feature=value``).
        tasks (tuple[str, ...]): label names, one head each (``T``).
        context_features (tuple[str, ...]): encoded request context features.
        user_features (tuple[str, ...]): encoded user features.
        dim (int): output embedding width ``D``.
        hidden (int): hidden width of both towers.
        max_history (int): most recent history events the user tower reads.
        hash_buckets (int): rows of each context / user feature table (codes are taken modulo).
        num_actions (int): size of the action-bitmask embedding (bitmask values are clamped below it).
        temperature (float): softmax temperature of the retrieval loss.
    """

    num_items: int
    num_terms: int
    tasks: tuple[str, ...]
    context_features: tuple[str, ...] = ()
    user_features: tuple[str, ...] = ()
    dim: int = 64
    hidden: int = 128
    max_history: int = 100
    hash_buckets: int = 1009
    num_actions: int = 16
    temperature: float = 0.05

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> TwoTowerConfig:
        d = dict(d)
        for key in ("tasks", "context_features", "user_features"):
            d[key] = tuple(d[key])
        return cls(**d)


@dataclass(frozen=True)
class ItemTerms:
    """Item attributes as jagged term ids, the item tower's input.

    Every ``(feature, value)`` pair of the catalogue is one term; a multi-valued feature gives one
    term per value.

    Attributes:
        vocab (tuple[str, ...]): ``feature=value`` strings; term id = position.
        offsets (torch.Tensor): int64 ``[N + 1]``.
        terms (torch.Tensor): int64 ``[nnz]``.
    """

    vocab: tuple[str, ...]
    offsets: torch.Tensor
    terms: torch.Tensor = field(repr=False)

    @classmethod
    def build(cls, attributes: list[dict], vocab: tuple[str, ...] | None = None) -> ItemTerms:
        """Term ids of ``attributes`` (N dicts); with ``vocab`` given, unseen terms are dropped."""
        keyed = [[f"{k}={v}" for k, vals in sorted(a.items()) for v in _as_list(vals)] for a in attributes]
        if vocab is None:
            vocab = tuple(sorted({t for row in keyed for t in row}))
        index = {t: i for i, t in enumerate(vocab)}
        rows = [[index[t] for t in row if t in index] for row in keyed]
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        terms = torch.tensor([t for r in rows for t in r], dtype=torch.int64)
        return cls(vocab=vocab, offsets=offsets, terms=terms)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


class ItemTower(nn.Module):
    """item id + attribute terms → L2-normalised embedding ``[M, D]``."""

    def __init__(self, cfg: TwoTowerConfig) -> None:
        super().__init__()
        self.ids = nn.Embedding(cfg.num_items, cfg.hidden)
        nn.init.normal_(self.ids.weight, std=0.02)
        self.terms = nn.EmbeddingBag(max(cfg.num_terms, 1), cfg.hidden, mode="mean")
        self.mlp = nn.Sequential(nn.Linear(2 * cfg.hidden, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.dim))

    def forward(self, rows: torch.Tensor, item_terms: ItemTerms) -> torch.Tensor:
        starts = item_terms.offsets[rows]  # [M]
        lengths = item_terms.offsets[rows + 1] - starts  # [M]
        offsets = torch.zeros_like(lengths)
        offsets[1:] = torch.cumsum(lengths, 0)[:-1]
        gather = torch.repeat_interleave(starts - offsets, lengths) + torch.arange(int(lengths.sum()))
        t = self.terms(item_terms.terms[gather], offsets)  # [M, H]
        x = torch.cat([self.ids(rows), t], dim=-1)  # [M, 2H]
        return F.normalize(self.mlp(x), dim=-1)  # [M, D]

    def cold(self, item_terms: ItemTerms) -> torch.Tensor:
        """Embeddings ``[M, D]`` of items the id table does not hold (every row of ``item_terms``):
        a zero id embedding beside the mean of their attribute terms, through the MLP."""
        m = item_terms.offsets.numel() - 1
        if m == 0:
            return torch.zeros(0, self.mlp[-1].out_features)
        t = self.terms(item_terms.terms, item_terms.offsets[:-1])  # [M, H]; no terms → 0
        return F.normalize(self.mlp(torch.cat([torch.zeros_like(t), t], dim=-1)), dim=-1)  # [M, D]


class UserTower(nn.Module):
    """history item embeddings + actions + recency, context and user features → embedding ``[R, D]``.

    The history is read through the *item tower's outputs* (at serving time: the item embeddings
    the index already caches), each event shifted by its action and position-from-the-end
    embeddings, mean pooled per request with ``index_add`` (no padding, no data-dependent shapes:
    the tower exports with ``torch.export``). An MLP over the pool
    and the request's context and user features adds a residual, so a user starts out near the
    items they engaged with and learns how to depart from them.
    """

    def __init__(self, cfg: TwoTowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.actions = nn.Embedding(cfg.num_actions, cfg.dim)
        self.recency = nn.Embedding(cfg.max_history, cfg.dim)
        for table in (self.actions, self.recency):
            nn.init.normal_(table.weight, std=0.02)
        names = cfg.context_features + cfg.user_features
        if len(set(names)) != len(names):
            raise ValueError(f"context and user features must have distinct names: {names}")
        self.features = nn.ModuleDict({n: nn.Embedding(cfg.hash_buckets, cfg.hidden) for n in names})
        width = cfg.dim + cfg.hidden * len(names)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * cfg.hidden), nn.GELU(), nn.Linear(2 * cfg.hidden, cfg.dim))

    def forward(
        self,
        history_vectors: torch.Tensor,
        history_actions: torch.Tensor,
        history_offsets: torch.Tensor,
        features: dict[str, torch.Tensor],
        timestamps: torch.Tensor | None = None,
        request_ts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """User embeddings ``[R, D]`` (``timestamps`` and ``request_ts`` unused: the sequence
        towers' interface)."""
        cfg = self.cfg
        starts = torch.arange(history_offsets.shape[0] - 1)  # gathers, not slices: no
        lengths = history_offsets[starts + 1] - history_offsets[starts]  # [R]  size-1 guards in export
        position = torch.arange(history_vectors.shape[0])  # [L]
        owner = torch.searchsorted(history_offsets, position, right=True) - 1  # [L]
        from_end = (history_offsets[owner + 1] - 1 - position).clamp(max=cfg.max_history - 1)
        e = (
            history_vectors + self.actions(history_actions.clamp(0, cfg.num_actions - 1)) + self.recency(from_end)
        )  # [L, D]
        summed = e.new_zeros(lengths.shape[0], e.shape[1]).index_add_(0, owner, e)
        pooled = summed / lengths.clamp(min=1)[:, None].to(e.dtype)  # [R, D]; empty history → 0
        parts = [pooled] + [
            self.features[n](features[n] % cfg.hash_buckets) for n in cfg.context_features + cfg.user_features
        ]
        return F.normalize(pooled + self.mlp(torch.cat(parts, dim=-1)), dim=-1)  # [R, D]

    def index_vectors(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The index's vectors of item-tower outputs ``[M, D]``: the outputs themselves."""
        return embeddings


class TaskQueries(nn.Module):
    """user embeddings ``[R, D]`` → one retrieval query per task ``[R, T, D]``: the shared user
    tower plus a task-specific dense layer (a residual, zero at initialisation), so one index of
    shared item embeddings serves every task (SilverTorch §5.2)."""

    def __init__(self, dim: int, num_tasks: int) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.proj = nn.Linear(dim, num_tasks * dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        r, d = users.shape
        return F.normalize(users[:, None, :] + self.proj(users).view(r, self.num_tasks, d), dim=-1)  # R may be 0


class TwoTower(nn.Module):
    """User tower, item tower and multi-task heads (one logit per task) over the pair.

    Args:
        cfg (TwoTowerConfig): sizes.

    Example::

        model = TwoTower(TwoTowerConfig(num_items=100, num_terms=10, tasks=("click",)))
        items = model.encode_items(torch.arange(100), item_terms)          # [100, 64]
        users = model.encode_users(items[[3, 7, 7]], torch.ones(3, dtype=torch.int64),
                                   torch.tensor([0, 1, 3]), {})             # [2, 64]
    """

    def __init__(self, cfg: TwoTowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_tower = ItemTower(cfg)
        self.user_tower = UserTower(cfg)
        self.task_heads = nn.Sequential(
            nn.Linear(3 * cfg.dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, len(cfg.tasks))
        )
        self.query_heads = TaskQueries(cfg.dim, len(cfg.tasks))

    def encode_items(self, rows: torch.Tensor, item_terms: ItemTerms) -> torch.Tensor:
        """Item embeddings ``[M, D]`` of item ``rows [M]``."""
        return self.item_tower(rows, item_terms)

    def encode_users(
        self,
        history_vectors: torch.Tensor,
        history_actions: torch.Tensor,
        history_offsets: torch.Tensor,
        features: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """User embeddings ``[R, D]`` from jagged histories: the item embeddings of the events
        (``[L, D]``), their action bitmasks (``[L]``) and offsets (``[R + 1]``), and encoded context /
        user features (each ``[R]``; a missing feature counts as code 0)."""
        r = history_offsets.numel() - 1
        feats = {n: features.get(n, torch.zeros(r, dtype=torch.int64)) for n in self.user_tower.features}
        return self.user_tower(history_vectors, history_actions, history_offsets, feats)

    def task_queries(self, users: torch.Tensor) -> torch.Tensor:
        """One retrieval query per task ``[R, T, D]`` from user embeddings ``[R, D]``."""
        return self.query_heads(users)

    def task_logits(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Per-task logits ``[M, T]`` of paired ``users [M, D]`` and ``items [M, D]``: an MLP over
        ``[user, item, user ⊙ item]``, so the tasks need not share the retrieval geometry."""
        return self.task_heads(torch.cat([users, items, users * items * self.cfg.dim**0.5], dim=-1))
