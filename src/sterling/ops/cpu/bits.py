"""64-bit word helpers for the CPU kernels (numba): LLVM's ``cttz`` / ``ctpop`` and the positions
of the set bits of a word array (a Bloom pass's surviving rows) without unpacking every bit."""

from __future__ import annotations

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = ["cttz", "float_bits", "bits_float", "popcount", "set_bits"]


@intrinsic
def cttz(typingctx, x):
    """Trailing zero count of a uint64 (LLVM ``cttz``)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))

    return sig, codegen


@intrinsic
def popcount(typingctx, x):
    """Set-bit count of a uint64 (LLVM ``ctpop``: one ``popcnt`` instruction)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


@intrinsic
def float_bits(typingctx, x):
    """The IEEE bits of a float32, as a uint32 (a bit cast)."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def bits_float(typingctx, x):
    """The float32 of IEEE bits given as a uint32 (a bit cast)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@numba.njit(nogil=True, cache=True)
def _set_bits(words):
    count = 0
    for w in words:
        count += popcount(w)
    out = np.empty(count, dtype=np.int64)
    i = 0
    for j in range(words.shape[0]):
        word = words[j]
        while word != 0:
            out[i] = (j << 6) + np.int64(cttz(word))
            i += 1
            word &= word - np.uint64(1)
    return out


def set_bits(words: torch.Tensor | np.ndarray) -> np.ndarray:
    """int64 ``[C]``, ascending: ``64 * w + j`` for every set bit ``j`` of word ``w`` of ``words``
    (int64 or uint64 ``[W]``)."""
    array = words.numpy() if isinstance(words, torch.Tensor) else np.asarray(words)
    return _set_bits(np.ascontiguousarray(array).view(np.uint64))
