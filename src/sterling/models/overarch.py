"""OverArch: the learned re-scorer over the ANN's K0 candidates (SilverTorch §5.1).

A dot product has no interaction parameters; OverArch scores every (request, candidate) pair with a
learned similarity and emits one logit per task. It reads only the request's user-side state (the
user tower output, the per-task queries, the history's cached item embeddings) and the candidates'
*cached* item-side state, so serving never re-runs the item tower.

Two variants behind one interface:

* :class:`MLPOverArch`: an MLP over ``[u, e, u ⊙ e, q·e]``.
* :class:`MoLOverArch`: Mixture of Logits (Zhai et al., KDD'23): ``P`` user-side components
  (``P - 1`` attention poolings of the history with learned queries, plus the user embedding) and
  ``P`` item-side components give ``P`` dot-product logits; a gate conditioned on the pair mixes them
  per task. A max-like mixture of several user "interests" is what one dot product cannot express.

Item-side parts depend on the item alone: :meth:`OverArch.item_state` is evaluated once per item at
publish time and cached; :meth:`OverArch.forward` takes the cached state.

Shapes: ``B`` requests, ``L`` padded history length, ``M`` candidates per request, ``D`` embedding
width, ``T`` tasks, ``P`` MoL components, ``S`` the item-state width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Masked attention logits: finite, so an empty history gives finite values *and gradients* (a row
# of -inf makes softmax / logsumexp return NaN gradients even where the output is discarded).
_MASKED = -1e4

__all__ = ["MLPOverArch", "MoLOverArch", "OverArch", "OverArchConfig", "make_overarch"]


@dataclass(frozen=True)
class OverArchConfig:
    """Sizes of an OverArch.

    Args:
        kind (str): "mlp" or "mol".
        dim (int): embedding width ``D`` of the user tower and the cached item embeddings.
        num_tasks (int): tasks ``T`` (one logit each).
        hidden (int): hidden width of the MLP / the MoL gate.
        components (int): MoL components ``P`` (>= 2: the user embedding plus ``P - 1`` interests).
        component_dim (int): width of each MoL component embedding.
    """

    kind: str = "mol"
    dim: int = 64
    num_tasks: int = 1
    hidden: int = 128
    components: int = 4
    component_dim: int = 32

    def __post_init__(self) -> None:
        if self.kind not in ("mlp", "mol"):
            raise ValueError(f"OverArch kind must be 'mlp' or 'mol', got {self.kind!r}")
        if self.kind == "mol" and self.components < 2:
            raise ValueError(f"a MoL OverArch needs components >= 2, got {self.components}")
        for name in ("dim", "num_tasks", "hidden", "component_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"OverArchConfig.{name} must be >= 1, got {getattr(self, name)}")

    def to_json(self) -> dict:
        return asdict(self)


class OverArch(nn.Module):
    """Interface of both variants.

    ``forward(user [B, D], queries [B, T, D], history [B, L, D], history_mask bool [B, L],
    items [B, M, S]) -> logits [B, M, T]`` where ``items`` is the cached :meth:`item_state` of the
    candidates.
    """

    cfg: OverArchConfig

    def item_state(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Item-side state ``[..., S]`` from item embeddings ``[..., D]`` (cached at publish)."""
        raise NotImplementedError

    @property
    def state_dim(self) -> int:
        """``S``, the width of :meth:`item_state`."""
        raise NotImplementedError


def _pair_features(user: torch.Tensor, queries: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """``[B, M, 3D + T]``: user, item, their product (scaled to unit variance) and each task query's
    dot product with the item (the ANN's own score, so OverArch starts from the retrieval order)."""
    b, m, d = items.shape
    u = user[:, None, :].expand(b, m, d)
    dots = torch.einsum("btd,bmd->bmt", queries, items)  # [B, M, T]
    return torch.cat([u, items, u * items * d**0.5, dots], dim=-1)


class MLPOverArch(OverArch):
    """An MLP over the pair features; the item state is the cached embedding itself."""

    def __init__(self, cfg: OverArchConfig) -> None:
        super().__init__()
        self.cfg = cfg
        width = 3 * cfg.dim + cfg.num_tasks
        self.mlp = nn.Sequential(nn.Linear(width, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.num_tasks))

    def item_state(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings

    @property
    def state_dim(self) -> int:
        return self.cfg.dim

    def forward(self, user, queries, history, history_mask, items):  # noqa: D102 (see OverArch)
        return self.mlp(_pair_features(user, queries, items))  # [B, M, T]


class MoLOverArch(OverArch):
    """Mixture of Logits.

    User side (once per request): component 0 is a projection of the user embedding; components
    1..P-1 attend over the history's cached embeddings with learned queries (each a soft "interest").
    Item side (cached): the item embedding followed by ``P`` projected components. Each component
    pair gives a cosine logit; a softmax gate over ``P`` per task, conditioned on the pair features,
    mixes them, and a per-task scale and bias turn the mixture into a logit, plus a learned
    multiple (``retrieval_weight``) of the task query's inner product with the item.
    """

    def __init__(self, cfg: OverArchConfig) -> None:
        super().__init__()
        self.cfg = cfg
        p, c, d = cfg.components, cfg.component_dim, cfg.dim
        self.interest_queries = nn.Parameter(torch.randn(p - 1, d) * d**-0.5)
        self.user_proj = nn.Linear(d, p * c)
        self.item_proj = nn.Linear(d, p * c)
        self.gate = nn.Sequential(
            nn.Linear(3 * d + cfg.num_tasks, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.num_tasks * (p + 1))
        )
        self.log_history_temperature = nn.Parameter(torch.tensor(20.0).log())
        self.scale = nn.Parameter(torch.full((cfg.num_tasks,), 5.0))
        self.bias = nn.Parameter(torch.zeros(cfg.num_tasks))
        self.retrieval_weight = nn.Parameter(torch.full((cfg.num_tasks,), 5.0))

    def item_state(self, embeddings: torch.Tensor) -> torch.Tensor:
        p, c = self.cfg.components, self.cfg.component_dim
        comps = F.normalize(self.item_proj(embeddings).unflatten(-1, (p, c)), dim=-1)  # [..., P, C]
        return torch.cat([embeddings, comps.flatten(-2)], dim=-1)  # [..., D + P·C]

    @property
    def state_dim(self) -> int:
        return self.cfg.dim + self.cfg.components * self.cfg.component_dim

    def user_components(self, user: torch.Tensor, history: torch.Tensor, history_mask: torch.Tensor) -> torch.Tensor:
        """``[B, P, C]`` normalised user-side components."""
        p, c, d = self.cfg.components, self.cfg.component_dim, self.cfg.dim
        att = torch.einsum("pd,bld->bpl", self.interest_queries, history) * d**0.5  # [B, P-1, L]
        att = torch.where(history_mask[:, None, :], att, _MASKED).softmax(-1) * history_mask[:, None, :]  # empty → 0
        interests = torch.einsum("bpl,bld->bpd", att, history)  # [B, P-1, D]; empty history → 0
        sources = torch.cat([user[:, None, :], interests], dim=1)  # [B, P, D]
        proj = self.user_proj.weight.view(p, c, d)  # component i reads source i
        bias = self.user_proj.bias.view(p, c)
        return F.normalize(torch.einsum("bpd,pcd->bpc", sources, proj) + bias, dim=-1)

    def nearest_history(self, emb: torch.Tensor, history: torch.Tensor, history_mask: torch.Tensor) -> torch.Tensor:
        """``[B, M]``: each candidate's soft maximum similarity to the history's items (a
        target-aware component: the interest nearest the candidate, whichever it is)."""
        temperature = self.log_history_temperature.exp()
        sim = torch.einsum("bmd,bld->bml", emb, history) * temperature  # [B, M, L]
        sim = torch.where(history_mask[:, None, :], sim, _MASKED)
        soft_max = torch.logsumexp(sim, dim=-1) / temperature
        return torch.where(history_mask.any(-1, keepdim=True), soft_max, 0.0)

    def forward(self, user, queries, history, history_mask, items):  # noqa: D102 (see OverArch)
        t, p, c, d = self.cfg.num_tasks, self.cfg.components, self.cfg.component_dim, self.cfg.dim
        emb, item_comps = items[..., :d], items[..., d:].unflatten(-1, (p, c))  # [B, M, D], [B, M, P, C]
        user_comps = self.user_components(user, history, history_mask)  # [B, P, C]
        logits = torch.einsum("bpc,bmpc->bmp", user_comps, item_comps)  # [B, M, P] cosines
        logits = torch.cat([logits, self.nearest_history(emb, history, history_mask)[..., None]], -1)
        gate = self.gate(_pair_features(user, queries, emb)).unflatten(-1, (t, p + 1)).softmax(-1)  # [B, M, T, P+1]
        mixed = (gate * logits[:, :, None, :]).sum(-1)  # [B, M, T]
        dots = torch.einsum("btd,bmd->bmt", queries, emb)  # [B, M, T]
        return mixed * self.scale + dots * self.retrieval_weight + self.bias


def make_overarch(cfg: OverArchConfig) -> OverArch:
    """The OverArch variant ``cfg.kind`` names."""
    return MLPOverArch(cfg) if cfg.kind == "mlp" else MoLOverArch(cfg)
