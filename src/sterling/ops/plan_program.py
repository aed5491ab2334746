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

import numpy as np
import torch

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
        (vectorised over the ops: a batch's program is validated on every search)."""
        if self.ops.dtype != torch.int64 or self.ops.dim() != 2 or self.ops.shape[1] != 3:
            raise ValueError(f"program ops must be int64 [T, 3], got {self.ops.dtype} {list(self.ops.shape)}")
        for name in ("rows", "starts"):
            t = getattr(self, name)
            if t.dtype != torch.int64 or t.dim() != 1:
                raise ValueError(f"program {name} must be int64 [*], got {t.dtype} {list(t.shape)}")
        starts, rows = self.starts.numpy(), self.rows.numpy()
        code, a, b = self.ops.numpy().T
        if len(starts) < 1 or starts[0] != 0 or starts[-1] != len(code):
            raise ValueError("program starts must run from 0 to the number of ops")
        if (np.diff(starts) < 1).any():
            raise ValueError("every plan needs at least one op")
        if len(rows) and (rows.min() < 0 or rows.max() >= num_bit_rows):
            raise ValueError(f"program rows must lie in [0, {num_bit_rows})")
        plan = np.searchsorted(starts, np.arange(len(code)), side="right") - 1  # [T], each op's plan
        combine = (code == AND) | (code == OR)
        leaf = (code >= ALL) & (code <= NONE)
        delta = np.where(combine, 1 - a, 1)
        total = np.cumsum(delta)
        height = total - np.concatenate([[0], total])[starts[:-1]][plan]  # [T], stack height after each op
        errors = [
            (
                leaf & ~((0 <= a) & (a < b) & (b <= len(rows))),
                lambda t: f"leaf reads rows[{a[t]}:{b[t]}] of {len(rows)}",
            ),
            (
                combine & ~((1 <= a) & (a <= height - delta)),
                lambda t: f"combines {a[t]} of {height[t] - delta[t]} stacked words",
            ),
            ((code < TRUE) | (code > OR), lambda t: f"unknown op code {code[t]}"),
            (height > self.depth, lambda t: f"needs a stack deeper than depth={self.depth}"),
        ]
        first = [(int(np.argmax(bad)), say) for bad, say in errors if bad.any()]
        if first:
            t, say = min(first, key=lambda found: found[0])
            raise ValueError(f"plan {plan[t]}: {say(t)}")
        final = height[starts[1:] - 1] if len(code) else np.zeros(0, dtype=np.int64)
        if (final != 1).any():
            g = int(np.argmax(final != 1))
            raise ValueError(f"plan {g} leaves {final[g]} words on the stack, not 1")


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
