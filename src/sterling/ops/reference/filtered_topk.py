"""Pure-PyTorch filtered top-k: the oracle every fast path is tested against."""

from __future__ import annotations

import torch


def filtered_topk(
    queries: torch.Tensor,
    items: torch.Tensor,
    mask: torch.Tensor | None,
    k: int,
    block: int = 65536,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k over the items passing ``mask``, scanned in blocks.

    Each block of at most ``block`` items is scored and reduced to its top-k, then merged with the
    running top-k, so memory stays O(B * (block + k)). A mask shared by the batch ([N]) scans only
    the passing rows (gathered block by block); a per-query mask ([B, N]) sets failing scores to
    -inf. Inputs are assumed valid (see :func:`sterling.ops.filtered_topk.filtered_topk`).

    Args:
        queries (torch.Tensor): float [B, D].
        items (torch.Tensor): float [N, D].
        mask (torch.Tensor | None): bool [N] or [B, N]; None lets every item pass.
        k (int): results per query, k >= 1.
        block (int): items scored at a time.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: scores float [B, k], descending, -inf past the last
        passing item; rows int64 [B, k], -1 there.
    """
    b = queries.shape[0]
    best_scores = torch.full((b, k), float("-inf"), dtype=queries.dtype)
    best_rows = torch.full((b, k), -1, dtype=torch.int64)
    candidates = mask.nonzero().squeeze(1) if mask is not None and mask.dim() == 1 else None
    total = items.shape[0] if candidates is None else len(candidates)
    for start in range(0, total, block):
        stop = min(start + block, total)
        if candidates is None:
            rows = torch.arange(start, stop)
            scores = queries @ items[start:stop].T  # [B, stop - start]
            if mask is not None:
                scores = scores.masked_fill(~mask[:, start:stop], float("-inf"))
        else:
            rows = candidates[start:stop]
            scores = queries @ items.index_select(0, rows).T  # [B, stop - start]
        top_scores, top = scores.topk(min(k, stop - start), dim=1)
        merged_scores = torch.cat([best_scores, top_scores], dim=1)  # [B, k + min(k, block)]
        merged_rows = torch.cat([best_rows, rows[top]], dim=1)
        best_scores, pick = merged_scores.topk(k, dim=1)
        best_rows = merged_rows.gather(1, pick)
    return best_scores, best_rows.masked_fill(best_scores == float("-inf"), -1)
