"""Atomic int64 array reads and updates for the CPU kernels (numba intrinsics): how the threads of
one kernel call share out its work and wait for each other without a lock (LLVM ``atomicrmw`` and
atomic ``load``, sequentially consistent: a count raised after some writes is seen by other threads
only with those writes)."""

from __future__ import annotations

from numba import types
from numba.extending import intrinsic

__all__ = ["fetch_add", "load"]


def _at(context, builder, array_type, array, index):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(data, [index])


@intrinsic
def fetch_add(typingctx, array, index, value):
    """``fetch_add(array, index, value)``: adds ``value`` to ``array[index]`` (int64, 1-D)
    atomically and returns the value before."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64 and array.ndim == 1):
        return None

    def codegen(context, builder, sig, args):
        at = _at(context, builder, sig.args[0], args[0], args[1])
        return builder.atomic_rmw("add", at, args[2], "seq_cst")

    return types.int64(array, types.int64, types.int64), codegen


@intrinsic
def load(typingctx, array, index):
    """``load(array, index)``: ``array[index]`` (int64, 1-D) read atomically, so that a loop waiting
    for another thread's write reads memory each time (a plain read may be hoisted out of it)."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64 and array.ndim == 1):
        return None

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_at(context, builder, sig.args[0], args[0], args[1]), "seq_cst", 8)

    return types.int64(array, types.int64), codegen
