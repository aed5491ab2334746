"""The kernel choice every op dispatcher takes (generative-recommenders' ``HammerKernel`` idea)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import TypeVar

__all__ = ["Kernel", "select"]

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
