"""The kernel choice every op dispatcher takes (generative-recommenders' ``HammerKernel`` idea), and
the input checks they share."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np
import torch

__all__ = ["Kernel", "all_finite", "host", "select"]

F = TypeVar("F", bound=Callable)


class Kernel(enum.Enum):
    """Which implementation runs an op: REFERENCE is the pure-PyTorch oracle (always present),
    CPU a faster CPU path, TRITON a GPU kernel (where an op has one)."""

    REFERENCE = "reference"
    CPU = "cpu"
    TRITON = "triton"


def select(op: str, kernels: Mapping[Kernel, F], kernel: Kernel | str) -> F:
    """The implementation of ``op`` for ``kernel``; a kernel the op lacks is a ValueError."""
    choice = Kernel(kernel)
    if choice not in kernels:
        have = ", ".join(k.value for k in kernels)
        raise ValueError(f"{op} has no {choice.value} kernel (available: {have})")
    return kernels[choice]


def host(t: torch.Tensor) -> np.ndarray:
    """The values of ``t`` as a numpy array (a view on the CPU): small checks cost microseconds in
    numpy and tens in torch (whose parallel reductions also leave OpenMP workers spinning), which a
    batch-1 search pays several times."""
    return t.numpy() if t.device.type == "cpu" else t.cpu().numpy()


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite (in numpy on the CPU, in torch on a GPU)."""
    return bool(torch.isfinite(t).all()) if t.is_cuda else bool(np.isfinite(host(t)).all())
