"""int8 scoring of 16 rows at a time on the CPU's dot-product units (numba intrinsics in LLVM IR).

The list-major scan (:mod:`sterling.ops.cpu.ivf_scan`) scores one list's rows against every query
that probes it. The rows are first re-laid in **blocks of 16 rows**: block word ``16 * j + i`` holds
bytes ``4j .. 4j + 3`` of row ``i`` (a 16 × 16 transpose of 32-bit words, :func:`transpose16`),
offset to unsigned (``code + 128``). One ``vpdpbusd`` then multiplies 4 bytes of 16 rows by the
same 4 bytes of the query, broadcast, and adds the 16 sums into 16 int32 lanes: ``D / 4``
instructions score 16 rows (:func:`block_mask`), where a row-at-a-time dot pays a horizontal sum
per row. The offset adds ``128 * sum(query codes)`` to every lane, which is subtracted.

Without AVX-512 VNNI (or when numba compiles for a generic CPU) the same IR is written with plain
vector multiplies and adds (``PORTABLE``), which LLVM lowers for whatever the CPU has; both are
compiled and tested against each other where the CPU has VNNI.
"""

from __future__ import annotations

import llvmlite.binding as llb
import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["HAS_VNNI", "block_mask", "block_mask_portable", "transpose16"]

#: numba compiles for this machine's CPU and it has AVX-512 VNNI.
HAS_VNNI = numba.config.CPU_NAME in (None, "host") and bool(llb.get_host_cpu_features().get("avx512vnni"))

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V16 = ir.VectorType(_I32, 16)
_F16 = ir.VectorType(ir.FloatType(), 16)
_B16 = ir.VectorType(ir.IntType(1), 16)


def _const_vector(values) -> ir.Constant:
    return ir.Constant(_V16, [ir.Constant(_I32, int(v)) for v in values])


def _pointer(context, builder, array_type, array, offset, element):
    """Address of ``array[offset]`` (a 1-D array's element) as a pointer to ``element``."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [offset]), element.as_pointer())


def _splat(builder, value, vtype=_V16):
    one = builder.insert_element(ir.Constant(vtype, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vtype, ir.Undefined), _const_vector([0] * 16))


def _dpbusd_vnni(builder, acc, a, b):
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V16, [_V16, _V16, _V16]), "llvm.x86.avx512.vpdpbusd.512"
    )
    return builder.call(fn, [acc, a, b])


def _dpbusd_plain(builder, acc, a, b):
    """``acc[i] += sum_t u8(a.byte[4i + t]) * s8(b.byte[4i + t])`` with plain vector ops."""
    v64i8 = ir.VectorType(ir.IntType(8), 64)
    v64i32 = ir.VectorType(_I32, 64)
    wide_a = builder.zext(builder.bitcast(a, v64i8), v64i32)
    wide_b = builder.sext(builder.bitcast(b, v64i8), v64i32)
    prod = builder.mul(wide_a, wide_b)
    for t in range(4):
        lanes = builder.shuffle_vector(prod, ir.Constant(v64i32, ir.Undefined), _const_vector(range(t, 64, 4)))
        acc = builder.add(acc, lanes)
    return acc


def _block_mask_codegen(dpbusd):
    def codegen(context, builder, sig, args):
        tcodes, t0, qwords, q0, groups, qfix, scales, s0, valid, cut = args
        words = _pointer(context, builder, sig.args[0], tcodes, t0, _I32)
        query = _pointer(context, builder, sig.args[2], qwords, q0, _I32)
        # 16 groups (64 dims) per step, into 4 independent sums (a dependent chain would wait out
        # the instruction's latency 16 times)
        slots = [cgutils.alloca_once_value(builder, ir.Constant(_V16, None)) for _ in range(4)]
        with cgutils.for_range(builder, builder.sdiv(groups, ir.Constant(_I64, 16))) as loop:
            tile = builder.mul(loop.index, ir.Constant(_I64, 16))
            sums = [builder.load(slot) for slot in slots]
            for j in range(16):
                at = builder.add(tile, ir.Constant(_I64, j))
                a_ptr = builder.gep(words, [builder.mul(at, ir.Constant(_I64, 16))])
                a = builder.load(builder.bitcast(a_ptr, _V16.as_pointer()), align=4)
                b = _splat(builder, builder.load(builder.gep(query, [at]), align=4))
                sums[j % 4] = dpbusd(builder, sums[j % 4], a, b)
            for slot, value in zip(slots, sums):
                builder.store(value, slot)
        total = [builder.load(slot) for slot in slots]
        acc_value = builder.add(builder.add(total[0], total[1]), builder.add(total[2], total[3]))
        acc = builder.sub(acc_value, _splat(builder, builder.trunc(qfix, _I32)))
        lanes = builder.icmp_signed("<", _const_vector(range(16)), _splat(builder, builder.trunc(valid, _I32)))
        scale_ptr = _pointer(context, builder, sig.args[6], scales, s0, _F16)
        masked_load = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(_F16, [_F16.as_pointer(), _I32, _B16, _F16]),
            "llvm.masked.load.v16f32.p0",
        )
        scale = builder.call(masked_load, [scale_ptr, ir.Constant(_I32, 4), lanes, ir.Constant(_F16, None)])
        score = builder.fmul(builder.sitofp(acc, _F16), scale)
        above = builder.and_(builder.fcmp_ordered(">=", score, _splat(builder, cut, _F16)), lanes)
        return builder.zext(builder.bitcast(above, ir.IntType(16)), _I64)

    return codegen


def _block_mask_typer(dpbusd):
    def typer(typingctx, tcodes, t0, qwords, q0, groups, qfix, scales, s0, valid, cut):
        sig = types.uint64(
            tcodes,
            types.int64,
            qwords,
            types.int64,
            types.int64,
            types.int64,
            scales,
            types.int64,
            types.int64,
            types.float32,
        )
        return sig, _block_mask_codegen(dpbusd)

    return typer


block_mask_portable = intrinsic(_block_mask_typer(_dpbusd_plain))
block_mask_portable.__doc__ = """Portable twin of :func:`block_mask` (plain vector IR)."""

block_mask = intrinsic(_block_mask_typer(_dpbusd_vnni if HAS_VNNI else _dpbusd_plain))
block_mask.__doc__ = """``block_mask(tcodes, t0, qwords, q0, groups, qfix, scales, s0, valid, cut)``: bit ``i`` set
when row ``i < valid`` of the block at ``tcodes[t0:]`` (int32, ``16 * groups`` words, see the module
docstring; ``groups`` a multiple of 16) scores ``(dot - qfix) * scales[s0 + i] >= cut``, with ``dot`` the int32 dot product of
the row's offset codes and the query words ``qwords[q0 : q0 + groups]`` (int8 codes, 4 per word).
Only ``scales[s0 : s0 + valid]`` is read."""


def _transpose_codegen(context, builder, sig, args):
    src, s_off, stride, dst, d_off = args
    rows_ptr = context.make_array(sig.args[0])(context, builder, src).data
    rows = []
    for i in range(16):
        at = builder.add(s_off, builder.mul(stride, ir.Constant(_I64, i)))
        rows.append(builder.load(builder.bitcast(builder.gep(rows_ptr, [at]), _V16.as_pointer()), align=4))
    for k in range(4):  # swap bit k of the row index with bit k of the column index
        bit = 1 << k
        for i in range(16):
            if i & bit:
                continue
            lo, hi = rows[i], rows[i | bit]
            rows[i] = builder.shuffle_vector(
                lo, hi, _const_vector([j if not j & bit else 16 + (j ^ bit) for j in range(16)])
            )
            rows[i | bit] = builder.shuffle_vector(
                lo, hi, _const_vector([j | bit if not j & bit else 16 + j for j in range(16)])
            )
    out = _pointer(context, builder, sig.args[3], dst, d_off, _I32)
    flip = _splat(builder, ir.Constant(_I32, 0x80808080))
    for j in range(16):
        at = builder.bitcast(builder.gep(out, [ir.Constant(_I64, 16 * j)]), _V16.as_pointer())
        builder.store(builder.xor(rows[j], flip), at, align=4)
    return ir.Constant(_I64, 0)


@intrinsic
def transpose16(typingctx, src, s_off, stride, dst, d_off):
    """``transpose16(src, s_off, stride, dst, d_off)``: ``dst[d_off + 16 j + i] = src[s_off + i *
    stride + j] ^ 0x80808080`` for ``i, j < 16`` (1-D int32 arrays: 16 rows of 16 words in, the
    block layout of the module docstring out, every byte offset to unsigned)."""
    sig = types.int64(src, types.int64, types.int64, dst, types.int64)
    return sig, _transpose_codegen
