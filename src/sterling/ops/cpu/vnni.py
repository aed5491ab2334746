"""int8 scoring of 16 rows against many queries on the CPU's dot-product units (numba intrinsics).

The list-major scan (:mod:`sterling.ops.cpu.ivf_scan`) scores a list's rows against every query
that probes it, 16 rows at a time. :func:`tile_dots` loads 16 rows of 64 int8 codes (one *tile*:
16 32-bit words per row), transposes them in registers (word ``j`` of the 16 rows in one vector),
offsets the bytes to unsigned (``code + 128``) and, for each query, runs 16 ``vpdpbusd``: each
multiplies 4 bytes of the 16 rows by the same 4 bytes of the query, broadcast, and adds the 16 sums
into 16 int32 lanes. The rows stay in registers across the queries (a GEMM micro-kernel with the
queries as its long side), where a row-at-a-time dot pays a horizontal sum per row. The offset adds
``128 * sum(query codes)`` to every lane, which :func:`tile_masks` subtracts before it scales each
row's sum and compares it with each query's cut; it lists only the queries with a row left (most
have none), so the caller's exact scoring visits no other.

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

__all__ = ["HAS_VNNI", "prefetch", "tile_dots", "tile_dots_portable", "tile_masks"]

#: numba compiles for this machine's CPU and it has AVX-512 VNNI.
HAS_VNNI = numba.config.CPU_NAME in (None, "host") and bool(llb.get_host_cpu_features().get("avx512vnni"))

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V16 = ir.VectorType(_I32, 16)
_F16 = ir.VectorType(ir.FloatType(), 16)
_B16 = ir.VectorType(ir.IntType(1), 16)


def _const_vector(values) -> ir.Constant:
    return ir.Constant(_V16, [ir.Constant(_I32, int(v)) for v in values])


def _base(context, builder, array_type, array):
    """The data pointer of a numba array argument."""
    return context.make_array(array_type)(context, builder, array).data


def _splat(builder, value, vtype=_V16):
    one = builder.insert_element(ir.Constant(vtype, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vtype, ir.Undefined), _const_vector([0] * 16))


def _masked_load(builder, pointer, mask, vtype):
    fn = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(vtype, [vtype.as_pointer(), _I32, _B16, vtype]),
        f"llvm.masked.load.v16{'f32' if vtype is _F16 else 'i32'}.p0",
    )
    return builder.call(
        fn, [builder.bitcast(pointer, vtype.as_pointer()), ir.Constant(_I32, 4), mask, ir.Constant(vtype, None)]
    )


def _lanes_below(builder, count):
    """<16 x i1>: lane i set when i < count."""
    return builder.icmp_signed("<", _const_vector(range(16)), _splat(builder, builder.trunc(count, _I32)))


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


def _transposed_tile(builder, rows_ptr, w0, stride, valid):
    """The 16 words of 16 rows (row i at ``rows_ptr[w0 + i * stride]``; rows >= valid read as
    zero, never loaded) as 16 vectors, vector j holding word j of every row, bytes offset to
    unsigned."""
    rows = []
    for i in range(16):
        at = builder.gep(rows_ptr, [builder.add(w0, builder.mul(stride, ir.Constant(_I64, i)))])
        here = _splat(builder, builder.icmp_signed(">", valid, ir.Constant(_I64, i)), _B16)
        rows.append(_masked_load(builder, at, here, _V16))
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
    flip = _splat(builder, ir.Constant(_I32, 0x80808080))
    return [builder.xor(row, flip) for row in rows]


def _tile_dots_codegen(dpbusd):
    def codegen(context, builder, sig, args):
        codes, w0, stride, valid, qwords, q0, qstride, sel, count, acc, first = args
        tile = _transposed_tile(builder, _base(context, builder, sig.args[0], codes), w0, stride, valid)
        queries = _base(context, builder, sig.args[4], qwords)
        picks = _base(context, builder, sig.args[7], sel)
        sums_ptr = _base(context, builder, sig.args[9], acc)
        with cgutils.for_range(builder, count) as loop:
            m = loop.index
            row = builder.load(builder.gep(picks, [m]))
            query = builder.gep(queries, [builder.add(q0, builder.mul(row, qstride))])
            sums = [ir.Constant(_V16, None)] * 4  # 4 independent chains (latency)
            for j in range(16):
                b = _splat(builder, builder.load(builder.gep(query, [ir.Constant(_I64, j)]), align=4))
                sums[j % 4] = dpbusd(builder, sums[j % 4], tile[j], b)
            total = builder.add(builder.add(sums[0], sums[1]), builder.add(sums[2], sums[3]))
            slot = builder.bitcast(builder.gep(sums_ptr, [builder.mul(m, ir.Constant(_I64, 16))]), _V16.as_pointer())
            before = builder.load(slot, align=4)
            builder.store(builder.select(first, total, builder.add(before, total)), slot, align=4)
        return ir.Constant(_I64, 0)

    return codegen


def _tile_dots_typer(dpbusd):
    def typer(typingctx, codes, w0, stride, valid, qwords, q0, qstride, sel, count, acc, first):
        i64 = types.int64
        sig = types.int64(codes, i64, i64, i64, qwords, i64, i64, sel, i64, acc, types.boolean)
        return sig, _tile_dots_codegen(dpbusd)

    return typer


tile_dots_portable = intrinsic(_tile_dots_typer(_dpbusd_plain))
tile_dots_portable.__doc__ = """Portable twin of :func:`tile_dots` (plain vector IR)."""

tile_dots = intrinsic(_tile_dots_typer(_dpbusd_vnni if HAS_VNNI else _dpbusd_plain))
tile_dots.__doc__ = """``tile_dots(codes, w0, stride, valid, qwords, q0, qstride, sel, count, acc, first)``: for
each ``m < count``, ``acc[16 m + i]`` (int32) becomes (``first``) or grows by the dot product of
row i's offset codes (``codes[w0 + i * stride :][:16]``, int32 words of 4 int8 codes, rows ``i >=
valid`` read as codes 0, never loaded) with the words of query ``sel[m]``, ``qwords[q0 + sel[m] *
qstride :][:16]`` (int8 codes, 4 per word): ``sum_d (code + 128) * q_d``. One call per 16-word tile
of the rows."""


def _tile_masks_codegen(context, builder, sig, args):
    acc, sel, count, fixes, scales, s0, valid, cuts, chunks, out = args
    sums_ptr = _base(context, builder, sig.args[0], acc)
    picks = _base(context, builder, sig.args[1], sel)
    fix_ptr = _base(context, builder, sig.args[3], fixes)
    cut_ptr = _base(context, builder, sig.args[7], cuts)
    chunk_ptr = _base(context, builder, sig.args[8], chunks)
    out_ptr = _base(context, builder, sig.args[9], out)
    lanes = _lanes_below(builder, valid)
    scale = _masked_load(builder, builder.gep(_base(context, builder, sig.args[4], scales), [s0]), lanes, _F16)
    found = cgutils.alloca_once_value(builder, ir.Constant(_I64, 0))
    with cgutils.for_range(builder, count) as loop:
        m = loop.index
        row = builder.load(builder.gep(picks, [m]))
        slot = builder.bitcast(builder.gep(sums_ptr, [builder.mul(m, ir.Constant(_I64, 16))]), _V16.as_pointer())
        fix = _splat(builder, builder.trunc(builder.load(builder.gep(fix_ptr, [row])), _I32))
        score = builder.fmul(builder.sitofp(builder.sub(builder.load(slot, align=4), fix), _F16), scale)
        cut = _splat(builder, builder.load(builder.gep(cut_ptr, [row])), _F16)
        above = builder.and_(builder.fcmp_ordered(">=", score, cut), lanes)
        hit = builder.and_(
            builder.zext(builder.bitcast(above, ir.IntType(16)), _I64), builder.load(builder.gep(chunk_ptr, [m]))
        )
        at = builder.load(found)  # branch-free: every slot is written, a hit advances the end
        builder.store(builder.or_(builder.shl(hit, ir.Constant(_I64, 32)), m), builder.gep(out_ptr, [at]))
        builder.store(
            builder.add(at, builder.zext(builder.icmp_unsigned("!=", hit, ir.Constant(_I64, 0)), _I64)), found
        )
    return builder.load(found)


@intrinsic
def tile_masks(typingctx, acc, sel, count, fixes, scales, s0, valid, cuts, chunks, out):
    """``tile_masks(acc, sel, count, fixes, scales, s0, valid, cuts, chunks, out)``: for each ``m <
    count`` (query ``q = sel[m]``), the rows ``i < valid`` whose score ``(acc[16 m + i] - fixes[q]) *
    scales[s0 + i]`` (float32) is at least ``cuts[q]``, as bits, ANDed with ``chunks[m]`` (the rows
    wanted); each m with a row left is appended to ``out`` (int64 [count]) as ``rows << 32 | m``,
    in order, and their number is returned. Only ``scales[s0 : s0 + valid]`` is read."""
    i64 = types.int64
    return types.int64(acc, sel, i64, fixes, scales, i64, i64, cuts, chunks, out), _tile_masks_codegen


def _prefetch_codegen(context, builder, sig, args):
    array, index = args
    at = builder.bitcast(builder.gep(_base(context, builder, sig.args[0], array), [index]), ir.IntType(8).as_pointer())
    fn = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32]),
        "llvm.prefetch.p0",
    )
    builder.call(fn, [at, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
    return ir.Constant(_I64, 0)


@intrinsic
def prefetch(typingctx, array, index):
    """``prefetch(array, index)``: asks the CPU to bring the cache line of ``array.flat[index]`` in
    (a hint: never faults, even past the end)."""
    return types.int64(array, types.int64), _prefetch_codegen
