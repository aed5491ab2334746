"""Int8 IVF scan dispatcher: validates once, then routes to a kernel.

The scan is the fused step 3-4 of SilverTorch's Algorithm 1 (silvertorch.md §3.3, §4.2): score the
rows of each query's probed clusters (cluster-sorted int8 codes) by int8 inner product, skip rows
the mask blocks, and return one global top-k per query. Optionally the top ``rescore_k``
candidates are re-ranked by the float inner product.

Masks come in three forms, all over *sorted* rows (the IVF order):

- bool [N]: one filter shared by the batch;
- bool [B, N]: one filter per query;
- bool [B, P, L]: a partial mask over the probed rows only (Algorithm 1): ``mask[b, p, j]`` is the
  verdict on row ``list_offsets[probes[b, p]] + j``; L is at least the longest probed cluster and
  entries past a cluster's end are ignored. :func:`probed_rows` gives the row of every slot.
"""

from __future__ import annotations

import torch

from sterling.ops.cpu import int8_scan as cpu
from sterling.ops.kernel import Kernel, select
from sterling.ops.reference import int8_scan as reference
from sterling.ops.reference.int8_scan import probed_rows

__all__ = ["Kernel", "int8_scan", "probed_rows"]

_KERNELS = {Kernel.REFERENCE: reference.int8_scan, Kernel.CPU: cpu.int8_scan}


def _desc(t: torch.Tensor) -> str:
    return f"{t.dtype} {list(t.shape)}"


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
    kernel: Kernel = Kernel.REFERENCE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k rows of each query's probed clusters by int8 inner product.

    Score of sorted row r for query b: ``(dot_int32(query_codes[b], codes[r]) * scales[r]) *
    query_scales[b]`` in float32, i.e. the inner product of the dequantized vectors.

    Args:
        query_codes (torch.Tensor): int8 [B, D], quantized queries.
        query_scales (torch.Tensor): float32 [B], > 0.
        codes (torch.Tensor): int8 [N, D], cluster-sorted item codes.
        scales (torch.Tensor): float32 [N] (per item) or [1] (global), > 0.
        list_offsets (torch.Tensor): int64 [nlist + 1], CSR cluster boundaries from 0 to N.
        probes (torch.Tensor): int64 [B, P], distinct clusters per query (nearest first for the
            CPU kernel's pruning to be effective); -1 marks an unused slot.
        k (int): results per query, >= 1.
        mask (torch.Tensor | None): bool [N], [B, N] or [B, P, L] (see the module docstring);
            None lets every row pass.
        rescore (tuple[torch.Tensor, torch.Tensor] | None): (float queries [B, D], float items
            [N, D] in sorted order): re-rank the int8 top-``rescore_k`` by the float inner product.
        rescore_k (int | None): candidates re-ranked, >= k; default k (re-rank only).
        kernel (Kernel): the implementation.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: scores float32 [B, k], descending, and sorted rows
        int64 [B, k]; where fewer than k rows pass, the tail holds -inf and -1.

    Example::

        from sterling.index.ivf import IVFLayout
        from sterling.index.quant import quantize, quantize_queries
        layout = IVFLayout.build(x, nlist=16)                 # x float [N, D]
        items, q = quantize(x[layout.order]), quantize_queries(queries)
        scores, rows = int8_scan(q.codes, q.scales, items.codes, items.scales,
                                 layout.list_offsets, layout.probe(queries, 4), k=10)
        ids = layout.order[rows.clamp(min=0)]                 # item ids (where rows >= 0)
    """
    _validate(query_codes, query_scales, codes, scales, list_offsets, probes, k, mask)
    if rescore is not None:
        fq, fi = rescore
        if (
            not (isinstance(fq, torch.Tensor) and isinstance(fi, torch.Tensor))
            or not (fq.is_floating_point() and fi.is_floating_point())
            or fq.shape != query_codes.shape
            or fi.shape != codes.shape
        ):
            raise ValueError(
                "rescore must be (float queries [B, D], float items [N, D]) matching the codes"
            )
    if rescore_k is not None:
        if isinstance(rescore_k, bool) or not isinstance(rescore_k, int) or rescore_k < k:
            raise ValueError(f"rescore_k must be an int >= k={k}, got {rescore_k!r}")
        if rescore is None:
            raise ValueError("rescore_k needs rescore")
    if codes.shape[0] == 0:  # nothing to score
        b = query_codes.shape[0]
        return torch.full((b, k), float("-inf")), torch.full((b, k), -1, dtype=torch.int64)
    return select("int8_scan", _KERNELS, kernel)(
        query_codes, query_scales, codes, scales, list_offsets, probes, k, mask, rescore, rescore_k
    )


def _validate(query_codes, query_scales, codes, scales, list_offsets, probes, k, mask) -> None:
    if query_codes.dtype != torch.int8 or query_codes.dim() != 2:
        raise ValueError(f"query_codes must be int8 [B, D], got {_desc(query_codes)}")
    if codes.dtype != torch.int8 or codes.dim() != 2 or codes.shape[1] != query_codes.shape[1]:
        raise ValueError(
            f"codes must be int8 [N, D={query_codes.shape[1]}], got {_desc(codes)}"
        )
    b, n = query_codes.shape[0], codes.shape[0]
    if query_scales.dtype != torch.float32 or query_scales.shape != (b,):
        raise ValueError(f"query_scales must be float32 [B={b}], got {_desc(query_scales)}")
    if scales.dtype != torch.float32 or scales.shape not in ((n,), (1,)):
        raise ValueError(f"scales must be float32 [N={n}] or [1], got {_desc(scales)}")
    if list_offsets.dtype != torch.int64 or list_offsets.dim() != 1 or len(list_offsets) < 2:
        raise ValueError(f"list_offsets must be int64 [nlist + 1], got {_desc(list_offsets)}")
    rises = int(list_offsets[0]) == 0 and int(list_offsets[-1]) == n
    if not rises or bool((list_offsets.diff() < 0).any()):
        raise ValueError(f"list_offsets must rise from 0 to N={n}")
    nlist = len(list_offsets) - 1
    if probes.dtype != torch.int64 or probes.dim() != 2 or probes.shape[0] != b:
        raise ValueError(f"probes must be int64 [B={b}, P], got {_desc(probes)}")
    if probes.numel():
        if int(probes.min()) < -1 or int(probes.max()) >= nlist:
            raise ValueError(f"probes must lie in [-1, nlist={nlist})")
        srt = probes.sort(dim=1).values
        if bool(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()):
            raise ValueError("probes must not repeat a cluster within a query")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if mask is not None:
        p = probes.shape[1]
        ok = mask.dtype == torch.bool and (
            mask.shape in ((n,), (b, n)) or (mask.dim() == 3 and mask.shape[:2] == (b, p))
        )
        if not ok:
            raise ValueError(
                f"mask must be bool [N={n}], [B={b}, N] or [B, P={p}, L], got {_desc(mask)}"
            )
        if mask.dim() == 3 and probes.numel():
            sizes = list_offsets.diff()[probes.clamp(min=0)].masked_fill(probes < 0, 0)
            if int(sizes.max()) > mask.shape[2]:
                raise ValueError(
                    "a partial mask [B, P, L] needs L >= the longest probed cluster "
                    f"({int(sizes.max())}), got {mask.shape[2]}"
                )
