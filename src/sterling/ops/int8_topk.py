"""Exact top-k over int8 rows dispatcher: validates once, then routes to a kernel.

The pre-filtering plan of the index (:mod:`sterling.index.segment`): the rows passing a selective
filter shared by a batch of queries are gathered once and every query scores all of them. The
score of row ``r`` for query ``b`` is ``dot(queries[b], codes[r]) * scales[r]`` in float32, the
inner product with the stored (dequantized) vector, as in :func:`sterling.ops.ivf_scan.ivf_scan`.

Kernels: ``Kernel.REFERENCE`` (:mod:`sterling.ops.reference.int8_topk`: dequantize, float matrix
product, ``torch.topk``) and ``Kernel.CPU`` (:mod:`sterling.ops.cpu.int8_topk`: an int8 × int8
matrix product on the CPU's int8 units, a bound-driven candidate cut and a float re-score of the
few survivors; the same top-k up to float32 rounding).
"""

from __future__ import annotations

import torch

from sterling.ops.cpu import int8_topk as cpu
from sterling.ops.kernel import Kernel, all_finite, select
from sterling.ops.reference import int8_topk as reference

__all__ = ["Kernel", "int8_topk"]

_KERNELS = {Kernel.REFERENCE: reference.int8_topk, Kernel.CPU: cpu.int8_topk}


def int8_topk(
    queries: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    rows: torch.Tensor | None,
    k: int,
    kernel: Kernel = Kernel.CPU,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k rows (of ``rows``, or all) with the largest ``dot(queries[b], codes[r]) * scales[r]``.

    Args:
        queries (torch.Tensor): float32 [B, D], finite.
        codes (torch.Tensor): int8 [N, D], values in [-127, 127].
        scales (torch.Tensor): float32 [N], finite, >= 0: one scale per row.
        rows (torch.Tensor | None): int64 [M], distinct rows of ``codes`` to score; None: all N.
        k (int): results per query, k >= 1.
        kernel (Kernel): the implementation.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: scores float32 [B, k], descending, and rows int64
        [B, k] (rows of ``codes``); past the last scored row, score -inf and row -1.

    Example::

        codes = torch.randint(-127, 128, (100, 8), dtype=torch.int8)
        scores, rows = int8_topk(torch.randn(2, 8), codes, torch.full((100,), 0.01), None, k=5)
    """
    if queries.dim() != 2 or queries.dtype != torch.float32:
        raise ValueError(f"queries must be float32 [B, D], got {queries.dtype} {list(queries.shape)}")
    if codes.dim() != 2 or codes.dtype != torch.int8 or codes.shape[1] != queries.shape[1]:
        raise ValueError(f"codes must be int8 [N, D] with D={queries.shape[1]}, got {codes.dtype} {list(codes.shape)}")
    if scales.dtype != torch.float32 or scales.shape != (codes.shape[0],):
        raise ValueError(f"scales must be float32 [N] with N={codes.shape[0]}, got {scales.dtype} {list(scales.shape)}")
    if not all_finite(queries):
        raise ValueError("queries hold NaN or infinite values")
    if rows is not None and (rows.dim() != 1 or rows.dtype != torch.int64):
        raise ValueError(f"rows must be int64 [M], got {rows.dtype} {list(rows.shape)}")
    if rows is not None and len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= codes.shape[0]):
        raise ValueError(f"rows must lie in [0, {codes.shape[0]})")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if rows is not None:  # the kernels score a contiguous block: gather it once, map back once
        codes, scales = codes.index_select(0, rows), scales.index_select(0, rows)
    scores, local = select("int8_topk", _KERNELS, kernel)(queries, codes, scales, k)
    if rows is None or not len(rows):
        return scores, local
    return scores, torch.where(local >= 0, rows[local.clamp(min=0)], -1)
