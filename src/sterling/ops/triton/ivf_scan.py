"""Filtered int8 IVF scan on GPU (Triton): Bloom plan over the probed clusters' words, masked int8
scores, one ``torch.topk``.

One program per (query, probed cluster) streams the cluster's rows ``BLOCK`` at a time (the rows
are cluster-sorted, so a probed cluster is one contiguous run of codes and of Bloom words; spec
``silvertorch.md`` §2.3, §3.3, §4). For each block it

1. evaluates the query's postfix plan (:mod:`sterling.ops.plan_program`) on the 64-bit Bloom words
   holding the block's rows: a stack of ``DEPTH`` word vectors in registers, AND / OR / NOT of the
   leaves' rows, only over the probed cluster (the partial mask of Algorithm 1), ANDed with the
   live-row words;
2. loads the block's int8 codes, widens them to fp32 in registers and takes the dot product with the
   fp32 query (no query quantization, as in the CPU kernel: the scores are the reference's,
   ``dot(codes[r], q) * scales[r]``), and writes the score of every passing row, -inf otherwise,
   into slot ``(query, probe, row - list start)`` of a ``[B, P, max_list]`` candidate buffer.

One ``torch.topk`` over each query's ``P × max_list`` slots then gives the k best (any k: the
buffer, not a register heap, bounds it) and the slots map back to rows arithmetically. Shapes are
static and nothing reads a device value on the host once ``max_list`` (the longest list) is
given, so a search can be captured in a CUDA graph. Tests run the kernel on CPU tensors with
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sterling.ops.plan_program import PlanProgram

_BLOCK = 64


@triton.jit
def _scan_kernel(
    queries,
    codes,
    scales,
    list_offsets,
    probes,
    bits,
    ops,
    leaf_rows,
    starts,
    plan_of,
    alive,
    out,
    P,
    W,
    D,
    max_list,
    HAS_ALIVE: tl.constexpr,
    DEPTH: tl.constexpr,
    BLOCK: tl.constexpr,
    D_BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    p = tl.program_id(1)
    cluster = tl.load(probes + b * P + p)
    if cluster >= 0:
        s = tl.load(list_offsets + cluster)
        e = tl.load(list_offsets + cluster + 1)
        plan = tl.load(plan_of + b)
        t0 = tl.load(starts + tl.maximum(plan, 0))
        t1 = tl.load(starts + tl.maximum(plan, 0) + 1)
        d = tl.arange(0, D_BLOCK)
        q = tl.load(queries + b * D + d, mask=d < D, other=0.0)  # [D_BLOCK]
        level = tl.arange(0, DEPTH)
        for base in range(s, e, BLOCK):
            r = base + tl.arange(0, BLOCK)  # [BLOCK] rows
            inside = r < e
            word = r >> 6
            keep = inside
            if plan >= 0:
                stack = tl.zeros([DEPTH, BLOCK], dtype=tl.int64)
                sp = t0 * 0  # int64, like the op arguments it is updated with
                for t in range(t0, t1):
                    code = tl.load(ops + 3 * t)
                    a = tl.load(ops + 3 * t + 1)
                    c = tl.load(ops + 3 * t + 2)
                    value = tl.zeros([BLOCK], dtype=tl.int64)
                    if code == 0:  # TRUE
                        value = value - 1
                    elif (code >= 2) & (code <= 4):  # ALL / ANY / NONE over leaf rows [a, c)
                        acc = tl.load(bits + tl.load(leaf_rows + a) * W + word, mask=inside, other=0)
                        for j in range(a + 1, c):
                            w = tl.load(bits + tl.load(leaf_rows + j) * W + word, mask=inside, other=0)
                            if code == 2:
                                acc = acc & w
                            else:
                                acc = acc | w
                        if code == 4:
                            acc = acc ^ -1
                        value = acc
                    elif code >= 5:  # AND / OR of the top a words
                        value = value - (code == 5).to(tl.int64)  # identity: all ones for AND, zero for OR
                        for j in range(0, a):
                            top = tl.sum(tl.where(level[:, None] == sp - 1 - j, stack, 0), axis=0)
                            if code == 5:
                                value = value & top
                            else:
                                value = value | top
                        sp = sp - a
                    stack = tl.where(level[:, None] == sp, value[None, :], stack)
                    sp = sp + 1
                result = tl.sum(tl.where(level[:, None] == 0, stack, 0), axis=0)
                keep = keep & (((result >> (r & 63)) & 1) != 0)
            if HAS_ALIVE:
                live = tl.load(alive + word, mask=inside, other=0)
                keep = keep & (((live >> (r & 63)) & 1) != 0)
            block = tl.load(codes + r[:, None] * D + d[None, :], mask=keep[:, None] & (d[None, :] < D), other=0)
            score = tl.sum(block.to(tl.float32) * q[None, :], axis=1) * tl.load(scales + r, mask=keep, other=0.0)
            score = tl.where(keep, score, float("-inf"))
            tl.store(out + (b * P + p) * max_list + (r - s), score, mask=inside)


def ivf_scan(
    queries: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    list_offsets: torch.Tensor,
    probes: torch.Tensor,
    k: int,
    bits: torch.Tensor,
    program: PlanProgram,
    plan_of: torch.Tensor,
    alive: torch.Tensor | None,
    max_list: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`sterling.ops.ivf_scan.ivf_scan` (inputs assumed valid, all on one device).

    ``max_list`` (the longest list; read from ``list_offsets`` when None, a host sync) sizes the
    candidate buffer ``[B, P, max_list]``."""
    device = queries.device
    b, p = probes.shape
    if max_list is None:
        max_list = int((list_offsets[1:] - list_offsets[:-1]).max()) if len(list_offsets) > 1 else 0
    max_list = max(max_list, 1)
    out = torch.full((b, p, max_list), float("-inf"), device=device)
    if b and p and codes.shape[0]:
        ops = program.ops.to(device)
        leaf_rows = program.rows.to(device) if len(program.rows) else torch.zeros(1, dtype=torch.int64, device=device)
        live = alive if alive is not None else torch.zeros(1, dtype=torch.int64, device=device)
        words = bits if bits.numel() else torch.zeros((1, 1), dtype=torch.int64, device=device)
        d = queries.shape[1]
        _scan_kernel[(b, p)](
            queries.contiguous(),
            codes.contiguous(),
            scales.contiguous(),
            list_offsets.contiguous(),
            probes.contiguous(),
            words.contiguous(),
            ops.contiguous(),
            leaf_rows,
            program.starts.to(device),
            plan_of.contiguous(),
            live.contiguous(),
            out,
            p,
            words.shape[1],
            d,
            max_list,
            HAS_ALIVE=alive is not None,
            DEPTH=triton.next_power_of_2(max(program.depth, 1)),
            BLOCK=_BLOCK,
            D_BLOCK=triton.next_power_of_2(d),
        )
    flat = out.view(b, p * max_list)
    top = torch.topk(flat, min(k, p * max_list), dim=1)  # [B, k']
    slot_probe, slot_row = top.indices // max_list, top.indices % max_list
    cluster = probes.gather(1, slot_probe).clamp(min=0)
    rows = torch.where(torch.isfinite(top.values), list_offsets[cluster] + slot_row, -1)
    scores = torch.full((b, k), float("-inf"), device=device)
    found = torch.full((b, k), -1, dtype=torch.int64, device=device)
    scores[:, : top.values.shape[1]] = top.values
    found[:, : rows.shape[1]] = rows
    return scores, found
