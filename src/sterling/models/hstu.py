"""HSTU: the Hierarchical Sequential Transduction Unit user tower (Zhai et al., ICML'24,
"Actions Speak Louder than Words"; generative-recommenders' ``HSTUJagged``), over jagged
sequences with a target-aware mask.

One layer, for the ``L`` tokens of a batch of jagged sequences (width ``D``, ``H`` heads, attention
width ``a`` and value width ``v`` per head)::

    x̂ = LayerNorm(x)                                       [L, D]
    u, v, q, k = split(SiLU(x̂ W1 + b1))                    [L, H·v], [L, H·v], [L, H·a], [L, H·a]
    A = SiLU(q kᵀ / √a + rab(p, t)) / N  ⊙ mask             [B, H, n, n]   (pointwise: no softmax)
    o = A v                                                 [L, H·v]
    x ← x + W2 · Dropout(u ⊙ LayerNorm(o))                  [L, D]

``rab`` is the relative attention bias of position and time: a learned weight per relative position
``p_i - p_j`` plus one per log-bucket of the time gap ``t_i - t_j`` (seconds). ``N`` is a **fixed**
constant (``HSTUConfig.norm_len``), not the batch's padded length as in the paper's code: with the
batch maximum, a sequence's output would depend on what else is in its batch, and a request scored
with its k candidates (ROO) would not equal each impression scored alone (spec ``roo.md`` §5.3).

**Target-aware mask.** The last ``num_targets[b]`` tokens of sequence ``b`` are candidates. History
tokens attend causally to history only; a candidate attends to the whole history and to itself,
never to another candidate, and all of a sequence's candidates sit at one position (the history's
length). So a candidate's output is a function of the history and of that candidate alone.

Projections and norms run on the jagged ``[L, ·]`` values; only the attention pads, to the longest
sequence of the batch (``[B, H, n, n]``), which is what a dense attention needs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sterling.models import jagged

__all__ = ["HSTU", "HSTUConfig", "target_aware_mask", "token_positions"]


@dataclass(frozen=True)
class HSTUConfig:
    """Sizes of an HSTU stack.

    Args:
        dim (int): token width ``D``.
        num_layers (int): HSTU layers.
        num_heads (int): heads ``H``.
        attention_dim (int): query/key width per head ``a``.
        value_dim (int): value (and gate) width per head ``v``.
        norm_len (int): the constant ``N`` of the ``1/N`` attention normalisation; also the number
            of relative-position weights (gaps beyond it share the last).
        time_buckets (int): log-spaced buckets of the time gap.
        dropout (float): on the gated attention output.
    """

    dim: int = 64
    num_layers: int = 2
    num_heads: int = 1
    attention_dim: int = 64
    value_dim: int = 64
    norm_len: int = 256
    time_buckets: int = 64
    dropout: float = 0.2

    def to_json(self) -> dict:
        return asdict(self)


def token_positions(offsets: torch.Tensor, num_targets: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """int64 ``[L]``: each token's position in its sequence, candidates all at the history length
    (``total``: ``L``, known without a host sync)."""
    row, col = jagged.row_and_column(offsets, total)
    history = jagged.lengths(offsets) - num_targets
    return torch.minimum(col, history[row])


def target_aware_mask(offsets: torch.Tensor, num_targets: torch.Tensor, n: int) -> torch.Tensor:
    """bool ``[B, n, n]``: ``mask[b, i, j]`` lets token ``i`` of sequence ``b`` attend to token ``j``.

    History (the first ``length - num_targets`` tokens) is causal over history; a candidate sees the
    whole history and itself; padding sees nothing and is seen by nothing."""
    lens = jagged.lengths(offsets)[:, None, None]  # [B, 1, 1]
    history = lens - num_targets[:, None, None]
    i = torch.arange(n)[None, :, None]  # query index
    j = torch.arange(n)[None, None, :]  # key index
    inside = (i < lens) & (j < lens)
    return inside & (((j <= i) & (j < history)) | (i == j))


def _time_bucket(gap: torch.Tensor, buckets: int) -> torch.Tensor:
    """Log-spaced bucket of a time gap in seconds (generative-recommenders' ``log(|Δt|) / 0.301``)."""
    return (torch.log(gap.abs().clamp(min=1).float()) / 0.301).long().clamp(0, buckets - 1)


def relative_index(
    positions: torch.Tensor,
    timestamps: torch.Tensor,
    norm_len: int,
    buckets: int,
    query_timestamps: torch.Tensor | None = None,
) -> torch.Tensor:
    """int64 ``[B, n, n]``: the row of :meth:`RelativeBias.table` of each (query ``i``, key ``j``)
    pair of padded ``positions``, ``timestamps [B, n]``: ``gap · buckets + bucket(τ_i − t_j)``,
    ``gap = clamp(p_i − p_j, 0, norm_len − 1)``, where a query's time ``τ_i`` is
    ``query_timestamps [B, n]`` (e.g. the time of the request it answers; None: its own event's
    ``t_i``). The same for every layer: computed once."""
    gap = (positions[:, :, None] - positions[:, None, :]).clamp(0, norm_len - 1)  # [B, n, n]
    query = timestamps if query_timestamps is None else query_timestamps
    dt = query[:, :, None] - timestamps[:, None, :]  # [B, n, n]
    return gap * buckets + _time_bucket(dt, buckets)


class RelativeBias(nn.Module):
    """``rab[b, i, j] = w_pos[p_i - p_j] + w_time[bucket(t_i - t_j)]`` (padded ``[B, n, n]``), read
    from one ``[norm_len · time_buckets]`` table at :func:`relative_index`."""

    def __init__(self, norm_len: int, time_buckets: int) -> None:
        super().__init__()
        self.norm_len, self.time_buckets = norm_len, time_buckets
        self.position = nn.Parameter(torch.empty(norm_len).normal_(std=0.02))
        self.time = nn.Parameter(torch.empty(time_buckets).normal_(std=0.02))

    def table(self) -> torch.Tensor:
        """``[norm_len · time_buckets]``: ``w_pos[g] + w_time[t]`` at row ``g · time_buckets + t``."""
        return (self.position[:, None] + self.time[None, :]).reshape(-1)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """The bias at :func:`relative_index`'s ``index`` (any shape)."""
        return self.table()[index]


class HSTULayer(nn.Module):
    """One HSTU layer over jagged tokens (see the module docstring)."""

    def __init__(self, cfg: HSTUConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, a, v = cfg.num_heads, cfg.attention_dim, cfg.value_dim
        self.norm = nn.LayerNorm(cfg.dim)
        self.uvqk = nn.Linear(cfg.dim, h * (2 * v + 2 * a))
        self.out_norm = nn.LayerNorm(h * v)
        self.out = nn.Linear(h * v, cfg.dim)
        self.bias = RelativeBias(cfg.norm_len, cfg.time_buckets)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, offsets: torch.Tensor, bias_index: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        return self.forward_with_keys(x, offsets, bias_index, mask)[0]

    def forward_with_keys(
        self, x: torch.Tensor, offsets: torch.Tensor, bias_index: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's output ``[L, D]`` and its keys ``[B, n, H, a]`` and values ``[B, n, H, v]``
        (padded), which candidates attending to these tokens reuse (:meth:`attend`); jagged
        ``x [L, D]`` (offsets ``[B + 1]``), the relative bias at ``bias_index [B, n, n]``
        (:func:`relative_index`), ``mask [B, n, n]``."""
        cfg = self.cfg
        h, a, v = cfg.num_heads, cfg.attention_dim, cfg.value_dim
        b, n = offsets.shape[0] - 1, mask.shape[-1]
        u, val, q, k = self._uvqk(x)  # [L, ·]
        qp = jagged.to_padded(q, offsets, n).view(b, n, h, a)  # [B, n, H, a]
        kp = jagged.to_padded(k, offsets, n).view(b, n, h, a)
        vp = jagged.to_padded(val, offsets, n).view(b, n, h, v)  # [B, n, H, v]
        scores = torch.einsum("bihd,bjhd->bhij", qp, kp) / math.sqrt(a)  # [B, H, n, n]
        scores = scores + self.bias(bias_index)[:, None]
        attn = F.silu(scores) / cfg.norm_len * mask[:, None]  # [B, H, n, n]
        o = torch.einsum("bhij,bjhd->bihd", attn, vp).reshape(b, n, h * v)  # [B, n, H·v]
        return self._update(x, u, jagged.from_padded(o, offsets, x.shape[0])), kp, vp

    def attend(
        self,
        y: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        gap_bias: torch.Tensor,
        time_gap: torch.Tensor,
        allowed: torch.Tensor,
    ) -> torch.Tensor:
        """Candidates ``y [B, m, D]`` (padded per request) through this layer, each attending to its
        request's history (``keys [B, n, H, a]``, ``values [B, n, H, v]`` from
        :meth:`forward_with_keys`, allowed ``[B, n]``) and to itself only: ``gap_bias [B, 1, n]``
        is the position bias of the candidates' position minus each history position,
        ``time_gap [B, m, n]`` the time gaps (seconds)."""
        cfg = self.cfg
        h, a, v = cfg.num_heads, cfg.attention_dim, cfg.value_dim
        b, m, _ = y.shape
        u, val, q, k = self._uvqk(y)  # [B, m, ·]
        q, k, val = q.view(b, m, h, a), k.view(b, m, h, a), val.view(b, m, h, v)
        bias = gap_bias + self.bias.time[_time_bucket(time_gap, self.bias.time_buckets)]  # [B, m, n]
        scores = torch.einsum("bihd,bjhd->bhij", q, keys) / math.sqrt(a) + bias[:, None]  # [B, H, m, n]
        attn = F.silu(scores) / cfg.norm_len * allowed[:, None, None, :]
        own_bias = self.bias.position[0] + self.bias.time[0]  # gap 0, time gap 0
        own = F.silu((q * k).sum(-1) / math.sqrt(a) + own_bias) / cfg.norm_len  # [B, m, H]
        o = torch.einsum("bhij,bjhd->bihd", attn, values) + own[..., None] * val  # [B, m, H, v]
        return self._update(y, u, o.reshape(b, m, h * v))

    def _uvqk(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cfg = self.cfg
        h, a, v = cfg.num_heads, cfg.attention_dim, cfg.value_dim
        return F.silu(self.uvqk(self.norm(x))).split([h * v, h * v, h * a, h * a], dim=-1)

    def _update(self, x: torch.Tensor, u: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return x + self.out(self.dropout(u * self.out_norm(o)))


class HSTU(nn.Module):
    """A stack of HSTU layers and a final LayerNorm over jagged token sequences.

    Args:
        cfg (HSTUConfig): sizes.

    Example::

        enc = HSTU(HSTUConfig(dim=16, attention_dim=8, value_dim=8))
        offsets = torch.tensor([0, 5, 8])                       # two sequences: 5 and 3 tokens
        out = enc(torch.randn(8, 16), offsets, torch.arange(8), torch.tensor([2, 1]))   # [8, 16]
    """

    def __init__(self, cfg: HSTUConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.num_layers))
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
        """Encoded tokens ``[L, D]`` of jagged ``x [L, D]`` (offsets ``[B + 1]``, timestamps
        ``int64 [L]`` in seconds, the last ``num_targets [B]`` tokens of each sequence candidates).
        ``max_len`` (at least the longest sequence) pads to a static width: no host sync, so
        ``torch.export`` traces it; the result is the same. ``query_timestamps`` (int64 ``[L]``):
        each token's time as a query, the time bias reading ``query_timestamps[i] − timestamps[j]``
        (:func:`relative_index`; None: ``timestamps``)."""
        lens = jagged.lengths(offsets)
        n = max_len if max_len is not None else (int(lens.max()) if lens.numel() else 0)
        mask = target_aware_mask(offsets, num_targets, n).to(x.dtype)  # [B, n, n]
        positions = token_positions(offsets, num_targets, x.shape[0])
        index = self._relative_index(offsets, positions, timestamps, n, query_timestamps)
        for layer in self.layers:
            x = layer(x, offsets, index, mask)
        return self.norm(x)

    def _relative_index(
        self,
        offsets: torch.Tensor,
        positions: torch.Tensor,
        timestamps: torch.Tensor,
        n: int,
        query_timestamps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:func:`relative_index` ``[B, n, n]`` of jagged ``positions``, ``timestamps`` and
        ``query_timestamps`` ``[L]``."""
        pos, ts = jagged.to_padded(positions, offsets, n), jagged.to_padded(timestamps, offsets, n)  # [B, n]
        query = None if query_timestamps is None else jagged.to_padded(query_timestamps, offsets, n)
        return relative_index(pos, ts, self.cfg.norm_len, self.cfg.time_buckets, query)

    def encode_candidates(
        self,
        history: torch.Tensor,
        history_offsets: torch.Tensor,
        history_ts: torch.Tensor,
        candidates: torch.Tensor,
        candidate_offsets: torch.Tensor,
        candidate_ts: torch.Tensor,
        chunk: int = 256,
    ) -> torch.Tensor:
        """Encoded candidates ``[C, D]`` of ``B`` requests (M-FALCON, HSTU paper §3.4): the history
        (jagged ``[L, D]``, offsets ``[B + 1]``, ``int64 [L]`` seconds) runs through the layers once,
        keeping each layer's keys and values; the candidates (jagged ``[C, D]``, offsets
        ``[B + 1]``, ``int64 [C]`` seconds) then attend to them ``chunk`` per request at a time.
        Equal to :meth:`forward` over ``[history ‖ candidates]`` with ``num_targets`` the candidate
        counts (the target-aware mask: a candidate sees the history and itself), at the cost of
        ``C × L`` attention instead of ``(L + C)²``, and with the history's work done once for
        all of its candidates."""
        cfg = self.cfg
        b = history_offsets.shape[0] - 1
        h_lens, c_lens = jagged.lengths(history_offsets), jagged.lengths(candidate_offsets)
        n, m = (int(h_lens.max()) if b else 0), (int(c_lens.max()) if b else 0)
        none = torch.zeros(b, dtype=torch.int64)
        mask = target_aware_mask(history_offsets, none, n).to(history.dtype)  # causal: history only
        index = self._relative_index(history_offsets, token_positions(history_offsets, none), history_ts, n)
        allowed = (torch.arange(n)[None, :] < h_lens[:, None]).to(history.dtype)  # [B, n]
        h_ts = jagged.to_padded(history_ts, history_offsets, n)  # [B, n]
        gap = (h_lens[:, None] - torch.arange(n)[None, :]).clamp(0, cfg.norm_len - 1)  # [B, n]
        layers = []
        x = history
        for layer in self.layers:  # the history once: keep every layer's keys and values
            x, keys, values = layer.forward_with_keys(x, history_offsets, index, mask)
            layers.append((layer, keys, values))
        y = jagged.to_padded(candidates, candidate_offsets, m)  # [B, m, D]
        c_ts = jagged.to_padded(candidate_ts, candidate_offsets, m)  # [B, m]
        out = []
        for s in range(0, m, chunk):  # candidates of a chunk never see each other: chunks are independent
            part, time_gap = y[:, s : s + chunk], c_ts[:, s : s + chunk, None] - h_ts[:, None, :]  # [B, c, n]
            for layer, keys, values in layers:
                part = layer.attend(part, keys, values, layer.bias.position[gap][:, None, :], time_gap, allowed)
            out.append(part)
        y = torch.cat(out, 1) if out else y
        return self.norm(jagged.from_padded(y, candidate_offsets))  # [C, D]
