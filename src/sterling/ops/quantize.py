"""Symmetric int8 quantization with one scale per row: the query side of the int8 kernels, and the
per-item scheme of the index (:mod:`sterling.index.quant`).

``codes = clamp(round(x / scale), -127, 127)`` and ``x ≈ codes * scale`` with ``scale_r = max_d
|x_rd| / 127`` (no zero point), so an inner product of two quantized rows is an int32 dot product
times the two scales. A positive per-query factor never changes the ranking within a query, so it
only rescales the reported scores. A zero row (all components 0) gets scale 1 and codes 0; NaN or
±inf anywhere is a ValueError.

Computed on the CPU in one compiled pass per row (numba), whatever the tensors' device: the query
side runs right before the numba kernels, where a parallel torch op leaves GNU OpenMP workers
spinning on the cores the kernel needs (``docs/benchmarks.md``, issue 23: ``GOMP_SPINCOUNT=300000
python bench/ivf_kernel.py``), and a batch-1 search pays each numpy call (~15 of them) of a numpy
version.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from sterling.ops.kernel import all_finite, host

__all__ = ["QMAX", "float_matrix", "int8_codes", "quantize_finite_rows", "quantize_rows"]

QMAX = 127


def float_matrix(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` (a finite float tensor ``[N, D]``) as float32; a ValueError naming ``name`` otherwise."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        got = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a float tensor [N, D], got {got}")
    if not all_finite(x):
        raise ValueError(f"{name} contains NaN or inf")
    return x.float()


def int8_codes(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 codes ``[N, D]`` (on the CPU) of float32 ``x`` ``[N, D]`` under ``scales`` (float32, one
    per row ``[N]`` / ``[N, 1]``, or one for all ``[1]``), rounding half to even."""
    a = host(x.detach())
    per = host(scales.detach()).reshape(-1)
    if len(per) not in (1, len(a)):
        raise ValueError(f"int8_codes needs one scale for all rows or one scale per row, got {len(per)} for {len(a)}")
    codes = np.empty(a.shape, dtype=np.int8)
    _encode(a, per, codes)
    return torch.from_numpy(codes)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes int8 ``[N, D]`` and scales float32 ``[N]`` (on the CPU) of ``x`` (float ``[N, D]``,
    finite), one scale per row (see the module docstring)."""
    return quantize_finite_rows(float_matrix(x, "x"))


def quantize_finite_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows` of ``x`` already known to be float32 ``[N, D]`` and finite (the kernels'
    queries, which their dispatchers check), without checking it again."""
    a = host(x.detach())
    codes = np.empty(a.shape, dtype=np.int8)
    scales = np.empty(len(a), dtype=np.float32)
    _quantize(a, codes, scales)
    return torch.from_numpy(codes), torch.from_numpy(scales)


@numba.njit(nogil=True, cache=True)
def _encode(a, scales, codes):
    """``codes[r, d] = clamp(rint(a[r, d] / scale_r), -QMAX, QMAX)`` with ``scale_r = scales[r]``, or
    ``scales[0]`` for every row when there is one scale (float32 division, as numpy's)."""
    top = np.float32(QMAX)
    for r in range(a.shape[0]):
        scale = scales[r] if len(scales) > 1 else scales[0]
        for d in range(a.shape[1]):
            codes[r, d] = np.int8(min(max(np.rint(a[r, d] / scale), -top), top))


@numba.njit(nogil=True, cache=True)
def _quantize(a, codes, scales):
    """``scales[r]``: the largest ``|a[r, d]|`` / QMAX (1 for a zero row), then :func:`_encode`."""
    for r in range(a.shape[0]):
        amax = np.float32(0)
        for d in range(a.shape[1]):
            amax = max(amax, abs(a[r, d]))
        scales[r] = amax / np.float32(QMAX) if amax > 0 else np.float32(1)
    _encode(a, scales, codes)
