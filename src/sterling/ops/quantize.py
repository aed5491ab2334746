"""Symmetric int8 quantization with one scale per row: the query side of the int8 kernels, and the
per-item scheme of the index (:mod:`sterling.index.quant`).

``codes = clamp(round(x / scale), -127, 127)`` and ``x ≈ codes * scale`` with ``scale_r = max_d
|x_rd| / 127`` (no zero point), so an inner product of two quantized rows is an int32 dot product
times the two scales. A positive per-query factor never changes the ranking within a query, so it
only rescales the reported scores. A zero row (all components 0) gets scale 1 and codes 0; NaN or
±inf anywhere is a ValueError.

Computed in numpy (on the CPU, whatever the tensors' device): the query side runs right before the
numba kernels, and a parallel torch op there leaves GNU OpenMP workers spinning on the cores the
kernel needs (``docs/benchmarks.md``, issue 23: ``GOMP_SPINCOUNT=300000 python bench/ivf_kernel.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from sterling.ops.kernel import all_finite, host

__all__ = ["QMAX", "float_matrix", "int8_codes", "quantize_rows"]

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
    """int8 codes ``[N, D]`` (on the CPU) of float32 ``x`` ``[N, D]`` under ``scales`` broadcastable
    to ``[N, 1]`` (rounding half to even)."""
    return torch.from_numpy(_codes(host(x.detach()), host(scales.detach())))


def _codes(x: np.ndarray, scales: np.ndarray) -> np.ndarray:
    steps = np.rint(x / scales)
    return np.minimum(np.maximum(steps, -QMAX, out=steps), QMAX, out=steps).astype(np.int8)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes int8 ``[N, D]`` and scales float32 ``[N]`` (on the CPU) of ``x`` (float ``[N, D]``,
    finite), one scale per row (see the module docstring)."""
    a = host(float_matrix(x, "x").detach())
    amax = np.abs(a).max(axis=1) if a.shape[1] else np.zeros(len(a), dtype=np.float32)
    scales = np.where(amax > 0, amax / np.float32(QMAX), np.float32(1)).astype(np.float32)
    return torch.from_numpy(_codes(a, scales[:, None])), torch.from_numpy(scales)
