"""Filtered int8 IVF scan dispatcher: validates once, then routes to a kernel.

The fused steps 2-4 of SilverTorch's Algorithm 1 (silvertorch.md §3.3, §4): for each query, the
rows of its probed clusters (items stored cluster-sorted as int8 codes with per-item scales), the
Bloom mask evaluated **only over those rows** by the query's plan program
(:mod:`sterling.ops.plan_program`), the live rows (tombstones cleared), the scores of the surviving
rows and one global top-k.

Scores are inner products of the float32 query with the stored vectors (``codes * scale``): the CPU
kernel quantizes the query to int8 only to cut rows on its dot-product units, with a bound that
keeps every row that could enter the top-k, and scores the survivors exactly, so the top-k needs
no re-scoring pass.

Kernels: ``Kernel.REFERENCE`` (:mod:`sterling.ops.reference.ivf_scan`, pure PyTorch, the oracle),
``Kernel.CPU`` (:mod:`sterling.ops.cpu.ivf_scan`, numba, list-major, VNNI, threaded) and ``Kernel.TRITON``
(:mod:`sterling.ops.triton.ivf_scan`, GPU; on CPU tensors under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from sterling.ops.cpu import ivf_scan as cpu
from sterling.ops.kernel import Kernel, all_finite, host, select
from sterling.ops.plan_program import PlanProgram, encode
from sterling.ops.reference import ivf_scan as reference

__all__ = ["Kernel", "PlanProgram", "encode", "ivf_scan", "list_bounds"]

list_bounds = cpu.list_bounds


def _reference(*args, bounds=None):
    return reference.ivf_scan(*args)  # scores every passing row exactly: no int8 cut to bound


def _triton(*args, bounds=None):
    from sterling.ops.triton import ivf_scan as gpu  # the [gpu] extra (triton); imported on first use

    return gpu.ivf_scan(*args)  # float scores on the GPU: no int8 cut to bound


_KERNELS = {Kernel.REFERENCE: _reference, Kernel.CPU: cpu.ivf_scan, Kernel.TRITON: _triton}


def _desc(t: torch.Tensor) -> str:
    return f"{t.dtype} {list(t.shape)}"


def ivf_scan(
    queries: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    list_offsets: torch.Tensor,
    probes: torch.Tensor,
    k: int,
    bits: torch.Tensor | None = None,
    program: PlanProgram | None = None,
    plan_of: torch.Tensor | None = None,
    alive: torch.Tensor | None = None,
    kernel: Kernel | None = None,
    bounds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k rows of each query's probed clusters that pass its Bloom plan, by int8 score.

    Score of sorted row r for query b: ``dot(codes[r], queries[b]) * scales[r]`` in float32, the
    inner product with the stored vector (kernels differ only in the order of the float32 sum).

    Args:
        queries (torch.Tensor): float32 [B, D], finite.
        codes (torch.Tensor): int8 [N, D], cluster-sorted item codes.
        scales (torch.Tensor): float32 [N], one scale per item.
        list_offsets (torch.Tensor): int64 [nlist + 1], cluster c is rows ``[offsets[c], offsets[c+1])``.
        probes (torch.Tensor): int64 [B, P], distinct clusters per query; -1 marks an unused slot.
        k (int): results per query, >= 1 (no upper cap).
        bits (torch.Tensor | None): int64 [R, W], the Bloom bits in the same row order, W =
            ceil(N / 64), row r in bit ``r % 64`` of word ``r // 64``.
        program (PlanProgram | None): G plans over ``bits``.
        plan_of (torch.Tensor | None): int64 [B], the plan of each query, -1 for no filter.
        alive (torch.Tensor | None): int64 [W], live-row words (a cleared bit: deleted row).
        kernel (Kernel | None): the implementation; None picks by device: ``TRITON`` for CUDA
            tensors, ``CPU`` otherwise.
        bounds (torch.Tensor | None): float32 [nlist], :func:`list_bounds` of ``codes`` (the CPU
            kernel's int8 cut; a caller that scans the same codes often keeps it, else it is
            computed per call).

    Returns:
        tuple[torch.Tensor, torch.Tensor]: scores float32 [B, k], descending, and sorted rows
        int64 [B, k]; where fewer than k rows pass, the tail holds -inf and -1.
    """
    b, n = _validate(queries, codes, scales, list_offsets, probes, k)
    words = (n + 63) // 64
    device = queries.device
    if program is None:
        program = encode([])
        plan_of = torch.full((b,), -1, dtype=torch.int64, device=device)
        bits = torch.zeros(0, words, dtype=torch.int64, device=device)
    elif bits is None or plan_of is None:
        raise ValueError("a program needs bits and plan_of")
    if bits.dtype != torch.int64 or bits.dim() != 2 or bits.shape[1] != words:
        raise ValueError(f"bits must be int64 [R, W={words}], got {_desc(bits)}")
    program.validate(bits.shape[0])
    if plan_of.dtype != torch.int64 or plan_of.shape != (b,):
        raise ValueError(f"plan_of must be int64 [B={b}], got {_desc(plan_of)}")
    if b and (host(plan_of).min() < -1 or host(plan_of).max() >= len(program)):
        raise ValueError(f"plan_of must lie in [-1, {len(program)})")
    if alive is not None and (alive.dtype != torch.int64 or alive.shape != (words,)):
        raise ValueError(f"alive must be int64 [W={words}], got {_desc(alive)}")
    if bounds is not None and (bounds.dtype != torch.float32 or bounds.shape != (len(list_offsets) - 1,)):
        raise ValueError(f"bounds must be float32 [nlist={len(list_offsets) - 1}], got {_desc(bounds)}")
    if kernel is None:
        kernel = Kernel.TRITON if queries.is_cuda else Kernel.CPU
    return select("ivf_scan", _KERNELS, kernel)(
        queries, codes, scales, list_offsets, probes, k, bits, program, plan_of, alive, bounds=bounds
    )


def _validate(queries, codes, scales, list_offsets, probes, k) -> tuple[int, int]:
    if queries.dtype != torch.float32 or queries.dim() != 2:
        raise ValueError(f"queries must be float32 [B, D], got {_desc(queries)}")
    if codes.dtype != torch.int8 or codes.dim() != 2 or codes.shape[1] != queries.shape[1]:
        raise ValueError(f"codes must be int8 [N, D={queries.shape[1]}], got {_desc(codes)}")
    b, n = queries.shape[0], codes.shape[0]
    if not all_finite(queries):
        raise ValueError("queries contain NaN or inf")
    if scales.dtype != torch.float32 or scales.shape != (n,):
        raise ValueError(f"scales must be float32 [N={n}], got {_desc(scales)}")
    if list_offsets.dtype != torch.int64 or list_offsets.dim() != 1 or len(list_offsets) < 2:
        raise ValueError(f"list_offsets must be int64 [nlist + 1], got {_desc(list_offsets)}")
    nlist = len(list_offsets) - 1
    if probes.dtype != torch.int64 or probes.dim() != 2 or probes.shape[0] != b:
        raise ValueError(f"probes must be int64 [B={b}, P], got {_desc(probes)}")
    defect = _layout_defect(host(list_offsets), n, host(probes))
    if defect == _FALLING:
        raise ValueError(f"list_offsets must rise from 0 to N={n}")
    if defect == _PROBE_RANGE:
        raise ValueError(f"probes must lie in [-1, nlist={nlist})")
    if defect == _PROBE_REPEAT:
        raise ValueError("probes must not repeat a cluster within a query")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    return b, n


_OK, _FALLING, _PROBE_RANGE, _PROBE_REPEAT = range(4)


@numba.njit(cache=True)
def _layout_defect(offsets, n, probes):
    """The first defect of the list layout and the probes, in one pass (they are checked on every
    search): ``_FALLING`` (offsets not rising from 0 to ``n``), ``_PROBE_RANGE``, ``_PROBE_REPEAT``
    (a cluster twice in one query's row), or ``_OK``."""
    nlist = len(offsets) - 1
    if offsets[0] != 0 or offsets[nlist] != n:
        return _FALLING
    for c in range(nlist):
        if offsets[c + 1] < offsets[c]:
            return _FALLING
    for b in range(probes.shape[0]):
        for j in range(probes.shape[1]):
            if probes[b, j] < -1 or probes[b, j] >= nlist:
                return _PROBE_RANGE
    seen = np.full(nlist, -1, np.int64)  # the last query that probed each cluster
    for b in range(probes.shape[0]):
        for j in range(probes.shape[1]):
            c = probes[b, j]
            if c >= 0:
                if seen[c] == b:
                    return _PROBE_REPEAT
                seen[c] = b
    return _OK
