"""SASRec (Kang & McAuley, ICDM'18): the classic self-attentive sequential recommender, the
baseline of the HSTU benchmarks, over the same jagged inputs and target-aware mask as
:class:`sterling.models.hstu.HSTU` (so either can be the user tower of the ranker and of retrieval).

Pre-LayerNorm Transformer blocks with softmax attention, learned position embeddings added to the
input, a final LayerNorm::

    x = x + P[recency]                                       [L, D]
    x = x + Dropout(MHA(LN(x), mask))                        softmax over allowed keys
    x = x + Dropout(FFN(LN(x)))                              FFN: D → 4D → D, GELU

Positions count back from the request: a history token's ``recency`` is the history length minus
its index (1 for the latest event), every candidate has recency 0. Counting from the end keeps a
truncated history's latest events at fixed positions and makes a candidate's position independent
of how many candidates share the sequence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sterling.models import jagged
from sterling.models.hstu import target_aware_mask, token_positions

__all__ = ["SASRec", "SASRecConfig"]


@dataclass(frozen=True)
class SASRecConfig:
    """Sizes of a SASRec stack.

    Args:
        dim (int): token width ``D``. num_layers (int): blocks. num_heads (int): heads.
        max_len (int): position embeddings (recencies beyond share the last).
        dropout (float): on the attention and feed-forward outputs.
    """

    dim: int = 64
    num_layers: int = 2
    num_heads: int = 1
    max_len: int = 256
    dropout: float = 0.2

    def to_json(self) -> dict:
        return asdict(self)


class SASRecBlock(nn.Module):
    """Pre-LN self-attention + feed-forward block over padded ``[B, n, D]``."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_norm = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.attn_out = nn.Linear(cfg.dim, cfg.dim)
        self.ffn_norm = nn.LayerNorm(cfg.dim)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.cfg.num_heads
        q, k, v = self.qkv(self.attn_norm(x)).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)  # [B, H, n, d/H]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])  # [B, H, n, d/H]
        x = x + self.dropout(self.attn_out(o.transpose(1, 2).reshape(b, n, d)))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class SASRec(nn.Module):
    """A SASRec stack over jagged token sequences (the :class:`~sterling.models.hstu.HSTU` interface).

    Args:
        cfg (SASRecConfig): sizes; ``dim`` must be divisible by ``num_heads``.
    """

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        if cfg.dim % cfg.num_heads:
            raise ValueError(f"dim {cfg.dim} is not divisible by num_heads {cfg.num_heads}")
        self.cfg = cfg
        self.position = nn.Embedding(cfg.max_len, cfg.dim)
        nn.init.normal_(self.position.weight, std=0.02)
        self.blocks = nn.ModuleList(SASRecBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(
        self,
        x: torch.Tensor,
        offsets: torch.Tensor,
        timestamps: torch.Tensor,
        num_targets: torch.Tensor,
        max_len: int | None = None,
        query_timestamps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encoded tokens ``[L, D]`` of jagged ``x [L, D]`` (offsets ``[B + 1]``; ``timestamps``
        and ``query_timestamps`` unused, kept for the shared interface; the last ``num_targets [B]``
        tokens are candidates; ``max_len`` as in :meth:`sterling.models.hstu.HSTU.forward`)."""
        lens = jagged.lengths(offsets)
        n = max_len if max_len is not None else (int(lens.max()) if lens.numel() else 0)
        row, _ = jagged.row_and_column(offsets, x.shape[0])
        recency = (lens - num_targets)[row] - token_positions(offsets, num_targets, x.shape[0])  # [L]
        x = x + self.position(recency.clamp(max=self.cfg.max_len - 1))
        # padding rows attend to themselves (a row with no allowed key would be NaN); discarded below
        allowed = target_aware_mask(offsets, num_targets, n) | torch.eye(n, dtype=torch.bool)
        padded = jagged.to_padded(x, offsets, n)  # [B, n, D]
        for block in self.blocks:
            padded = block(padded, allowed)
        return self.norm(jagged.from_padded(padded, offsets, x.shape[0]))
