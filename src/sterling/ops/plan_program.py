"""Bloom filter plans as flat integer programs, the form every kernel of the filtered scan reads.

A :class:`~sterling.index.bloom_plan.BloomPlan` is a postfix program over Bloom bit rows. For kernels,
G plans are concatenated into three tensors (:class:`PlanProgram`):

- ``ops`` int64 [T, 3]: one ``(code, a, b)`` per instruction;
- ``rows`` int64 [A]: Bloom bit rows read by the leaves;
- ``starts`` int64 [G + 1]: plan ``g`` is ``ops[starts[g]:starts[g + 1]]``.

Instructions push one word (64 items) each onto a stack:

==========  ===================================================================
``TRUE``    all ones                      ``FALSE``  all zeros
``ALL``     AND of bit rows ``rows[a:b]``  ``ANY``    their OR     ``NONE``  NOT of their OR
``AND``     pops ``a`` words, pushes their AND            ``OR``  the same with OR
==========  ===================================================================

After a plan's last instruction the stack holds exactly one word: the items that may pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numba
import torch

from sterling.ops.kernel import host

TRUE, FALSE, ALL, ANY, NONE, AND, OR = range(7)
_CODES = {"true": TRUE, "false": FALSE, "all": ALL, "any": ANY, "none": NONE, "and": AND, "or": OR}

__all__ = [
    "ALL",
    "AND",
    "ANY",
    "FALSE",
    "NONE",
    "OR",
    "TRUE",
    "PlanProgram",
    "bit_of",
    "pack_rows",
    "encode",
    "plan_mask",
    "plan_words",
]


class _Plan(Protocol):
    program: tuple[tuple[str, Any], ...]
    rows: tuple[int, ...]


@dataclass(frozen=True)
class PlanProgram:
    """G filter plans as one flat program (see the module docstring).

    Args:
        ops (torch.Tensor): int64 [T, 3].
        rows (torch.Tensor): int64 [A].
        starts (torch.Tensor): int64 [G + 1].
        depth (int): the deepest stack any plan needs (>= 1 when G > 0).
    """

    ops: torch.Tensor
    rows: torch.Tensor
    starts: torch.Tensor
    depth: int

    def __len__(self) -> int:
        return len(self.starts) - 1

    def validate(self, num_bit_rows: int) -> None:
        """Raises ValueError unless the program is well formed for ``num_bit_rows`` Bloom rows
        (one compiled pass, :func:`_first_error`: a batch's program is validated on every search).
        A program found well formed is not checked again for the same row count while its tensors
        stay the ones checked (the same storage, shape and version: an in-place change bumps it)."""
        checked = (num_bit_rows, *((t.data_ptr(), t.shape, t._version) for t in (self.ops, self.rows, self.starts)))
        if self.__dict__.get("_checked") == checked:
            return
        if self.ops.dtype != torch.int64 or self.ops.dim() != 2 or self.ops.shape[1] != 3:
            raise ValueError(f"program ops must be int64 [T, 3], got {self.ops.dtype} {list(self.ops.shape)}")
        for name in ("rows", "starts"):
            t = getattr(self, name)
            if t.dtype != torch.int64 or t.dim() != 1:
                raise ValueError(f"program {name} must be int64 [*], got {t.dtype} {list(t.shape)}")
        starts, rows, ops = host(self.starts), host(self.rows), host(self.ops)
        if len(starts) < 1 or starts[0] != 0 or starts[-1] != len(ops):
            raise ValueError("program starts must run from 0 to the number of ops")
        kind, plan, _, x, y = _first_error(ops, rows, starts, num_bit_rows, self.depth)
        if kind == _EMPTY_PLAN:
            raise ValueError("every plan needs at least one op")
        if kind == _ROW_RANGE:
            raise ValueError(f"program rows must lie in [0, {num_bit_rows})")
        messages = {
            _LEAF: lambda: f"leaf reads rows[{x}:{y}] of {len(rows)}",
            _COMBINE: lambda: f"combines {x} of {y} stacked words",
            _UNKNOWN: lambda: f"unknown op code {x}",
            _DEEP: lambda: f"needs a stack deeper than depth={self.depth}",
            _LEFT: lambda: f"leaves {x} words on the stack, not 1",
        }
        if kind in messages:
            raise ValueError(f"plan {plan}: {messages[kind]()}")
        object.__setattr__(self, "_checked", checked)


_OK, _EMPTY_PLAN, _ROW_RANGE, _LEAF, _COMBINE, _UNKNOWN, _DEEP, _LEFT = range(8)


@numba.njit(cache=True)
def _first_error(ops, rows, starts, num_bit_rows, depth):
    """The first defect of a program whose ``starts`` run from 0 to ``len(ops)``, in one pass (a
    batch's program is validated on every search): ``(kind, plan, op, x, y)``, kind ``_OK`` when
    there is none. Plans are checked in order, each op by op (leaf rows, combine arity, op code,
    stack depth), then its final stack."""
    for g in range(len(starts) - 1):
        if starts[g + 1] <= starts[g]:
            return _EMPTY_PLAN, g, 0, 0, 0
    for i in range(len(rows)):
        if rows[i] < 0 or rows[i] >= num_bit_rows:
            return _ROW_RANGE, 0, i, 0, 0
    for g in range(len(starts) - 1):
        height = 0
        for t in range(starts[g], starts[g + 1]):
            code, a, b = ops[t, 0], ops[t, 1], ops[t, 2]
            if ALL <= code <= NONE and not (0 <= a < b <= len(rows)):
                return _LEAF, g, t, a, b
            if code == AND or code == OR:
                if not 1 <= a <= height:
                    return _COMBINE, g, t, a, height
                height += 1 - a
            elif TRUE <= code <= NONE:
                height += 1
            else:
                return _UNKNOWN, g, t, code, 0
            if height > depth:
                return _DEEP, g, t, 0, 0
        if height != 1:
            return _LEFT, g, 0, height, 0
    return _OK, 0, 0, 0, 0


def encode(plans: Sequence[_Plan]) -> PlanProgram:
    """Concatenates Bloom plans (``program`` of ``(op, arg)`` over local indexes into
    ``plan.rows``) into one :class:`PlanProgram`."""
    ops: list[tuple[int, int, int]] = []
    rows: list[int] = []
    starts = [0]
    depth = 1
    for plan in plans:
        height = 0
        for op, arg in plan.program:
            code = _CODES[op]
            if code in (ALL, ANY, NONE):
                ops.append((code, len(rows), len(rows) + len(arg)))
                rows.extend(plan.rows[i] for i in arg)
            elif code in (AND, OR):
                ops.append((code, int(arg), 0))
            else:
                ops.append((code, 0, 0))
            height = height - int(arg) + 1 if code in (AND, OR) else height + 1
            depth = max(depth, height)
        starts.append(len(ops))
    return PlanProgram(
        torch.tensor(ops, dtype=torch.int64).reshape(-1, 3),
        torch.tensor(rows, dtype=torch.int64),
        torch.tensor(starts, dtype=torch.int64),
        depth,
    )


def pack_rows(mask: torch.Tensor) -> torch.Tensor:
    """int64 [ceil(N / 64)]: bool [N] packed 64 rows per word, row r in bit r % 64 of word r // 64."""
    n = mask.shape[0]
    padded = torch.zeros((n + 63) // 64 * 64, dtype=torch.int64)
    padded[:n] = mask.to(torch.int64)
    shifts = torch.arange(64, dtype=torch.int64)
    return (padded.view(-1, 64) << shifts).sum(1)  # distinct bits: sum == OR (bit 63 wraps to sign)


def bit_of(words: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """bool [M]: bit ``rows & 63`` of ``words[rows >> 6]`` (words int64 [W], rows int64 [M])."""
    return ((words[rows >> 6] >> (rows & 63)) & 1).bool()


def plan_words(bits: torch.Tensor, program: PlanProgram, plan: int, cols: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [W]: plan ``plan`` of ``program`` evaluated word by word on Bloom ``bits`` int64
    [R, W], or int64 [C] on the word columns ``cols`` (int64 [C]) only."""
    stack: list[torch.Tensor] = []
    start, stop = int(program.starts[plan]), int(program.starts[plan + 1])
    width = bits.shape[1] if cols is None else len(cols)
    for code, a, b in program.ops[start:stop].tolist():
        if code in (TRUE, FALSE):
            stack.append(torch.full((width,), -1 if code == TRUE else 0, dtype=torch.int64))
        elif code in (ALL, ANY, NONE):
            leaves = bits[program.rows[a:b]]  # [L, W]: only the rows the leaf reads
            leaves = leaves if cols is None else leaves[:, cols]
            acc = leaves[0].clone()
            for leaf in leaves[1:]:
                acc = acc & leaf if code == ALL else acc | leaf
            stack.append(~acc if code == NONE else acc)
        else:
            parts, stack = stack[-a:], stack[:-a]
            acc = parts[0]
            for part in parts[1:]:
                acc = acc & part if code == AND else acc | part
            stack.append(acc)
    (out,) = stack
    return out


def plan_mask(bits: torch.Tensor, program: PlanProgram, plan: int, rows: torch.Tensor) -> torch.Tensor:
    """bool [M]: plan ``plan`` of ``program`` evaluated on the Bloom ``bits`` (int64 [R, W]) of
    ``rows`` (int64 [M])."""
    words = plan_words(bits, program, plan, cols=rows >> 6)  # the word holding each row
    return ((words >> (rows & 63)) & 1).bool()
