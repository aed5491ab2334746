"""Pure-PyTorch per-row int8 quantization: the oracle of :func:`sterling.ops.quantize.quantize_rows`."""

from __future__ import annotations

import torch

from sterling.ops.quantize import QMAX


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes int8 [N, D] and scales float32 [N] of float32 ``x`` [N, D] (finite): ``scale = max |x| /
    QMAX`` per row (1 for a zero row), ``codes = clamp(round(x / scale), -QMAX, QMAX)``, half to even."""
    amax = x.abs().amax(1) if x.shape[1] else torch.zeros(len(x))
    scales = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax)).float()
    return (x / scales[:, None]).round().clamp(-QMAX, QMAX).to(torch.int8), scales
