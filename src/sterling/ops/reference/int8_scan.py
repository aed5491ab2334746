"""Pure-PyTorch int8 IVF scan: the oracle every fast path is tested against.

Follows the spec's reference path (silvertorch.md §8): a padded [B, P, L] gather of the probed
rows, the mask over those rows, exact int32 dot products, ``masked_fill(-inf)``, one global top-k
per query. Queries are processed in chunks so the gathered codes stay below ~64 MiB.

Score of sorted row r for query b (both paths compute it the same way, in float32, so they agree
bit for bit): ``(float(dot_int32(q_codes[b], codes[r])) * item_scale[r]) * query_scale[b]``.
The int32 dot is exact and converts to float32 exactly while |dot| < 2^24 (always for D <= 1040).
"""

from __future__ import annotations

import torch

_GATHER_ELEMS = 1 << 24  # codes gathered per chunk of queries


def probed_rows(list_offsets: torch.Tensor, probes: torch.Tensor, width: int) -> torch.Tensor:
    """int64 [B, P, width]: the sorted rows of each probed cluster, -1 past its end or for a
    probe slot of -1. ``width`` must be at least the longest probed cluster."""
    sizes = list_offsets.diff()
    valid_probe = probes >= 0
    c = probes.clamp(min=0)
    starts = torch.where(valid_probe, list_offsets[c], 0)  # [B, P]
    lens = torch.where(valid_probe, sizes[c], 0)  # [B, P]
    j = torch.arange(width)
    rows = starts[..., None] + j  # [B, P, width]
    return rows.masked_fill_(j >= lens[..., None], -1)


def rescore_topk(
    rows: torch.Tensor,
    float_queries: torch.Tensor,
    float_items: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-ranks candidate ``rows`` int64 [B, K'] (-1 = none) by the float inner product and keeps
    the top ``k`` (k <= K'); shared by every kernel so rescored scores agree exactly."""
    valid = rows >= 0
    vecs = float_items[rows.clamp(min=0)].float()  # [B, K', D]
    scores = torch.bmm(vecs, float_queries.float()[:, :, None]).squeeze(2)  # [B, K']
    scores = scores.masked_fill_(~valid, float("-inf"))
    top, pick = scores.topk(k, dim=1)
    out_rows = rows.gather(1, pick).masked_fill_(torch.isneginf(top), -1)
    return top, out_rows


def int8_scan(
    query_codes: torch.Tensor,
    query_scales: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    list_offsets: torch.Tensor,
    probes: torch.Tensor,
    k: int,
    mask: torch.Tensor | None = None,
    rescore: tuple[torch.Tensor, torch.Tensor] | None = None,
    rescore_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k sorted rows of the probed clusters by int8 score (see the module docstring).

    Inputs are assumed valid (see :func:`sterling.ops.int8_scan.int8_scan`), with ``mask`` one of
    None, bool [N], bool [B, N] or bool [B, P, L] (over :func:`probed_rows` with width L), and
    ``rescore`` None or (float queries [B, D], float items [N, D] in sorted order).

    Returns:
        tuple[torch.Tensor, torch.Tensor]: scores float32 [B, k], descending, -inf past the last
        passing row; rows int64 [B, k], -1 there.
    """
    b, p = probes.shape
    n = codes.shape[0]
    kk = k if rescore is None else max(k, rescore_k or k)
    sizes = list_offsets.diff()
    longest = int(sizes[probes.clamp(min=0)].masked_fill(probes < 0, 0).max()) if b * p else 0
    width = mask.shape[2] if mask is not None and mask.dim() == 3 else longest
    item_scales = scales.expand(n) if scales.shape[0] != n else scales
    best_scores = torch.full((b, kk), float("-inf"))
    best_rows = torch.full((b, kk), -1, dtype=torch.int64)
    chunk = max(1, _GATHER_ELEMS // max(1, p * width * codes.shape[1]))
    for start in range(0, b, chunk):
        stop = min(start + chunk, b)
        rows = probed_rows(list_offsets, probes[start:stop], width)  # [c, P, L]
        valid = rows >= 0
        safe = rows.clamp(min=0)
        if mask is None:
            passing = valid
        elif mask.dim() == 1:
            passing = valid & mask[safe]
        elif mask.dim() == 2:
            passing = valid & mask[start:stop].gather(1, safe.flatten(1)).view_as(safe)
        else:
            passing = valid & mask[start:stop]
        q = query_codes[start:stop].int()[:, None, None, :]  # [c, 1, 1, D]
        dots = (codes[safe].int() * q).sum(-1)  # [c, P, L] int (exact)
        s = dots.float() * item_scales[safe]
        s = (s * query_scales[start:stop, None, None]).masked_fill_(~passing, float("-inf"))
        s, rows = s.flatten(1), rows.flatten(1)  # [c, P * L]
        if s.shape[1] < kk:
            pad = kk - s.shape[1]
            s = torch.cat([s, torch.full((stop - start, pad), float("-inf"))], 1)
            rows = torch.cat([rows, torch.full((stop - start, pad), -1, dtype=torch.int64)], 1)
        top, pick = s.topk(kk, dim=1)
        best_scores[start:stop] = top
        best_rows[start:stop] = rows.gather(1, pick).masked_fill_(torch.isneginf(top), -1)
    if rescore is not None:
        return rescore_topk(best_rows, rescore[0], rescore[1], k)
    return best_scores, best_rows
