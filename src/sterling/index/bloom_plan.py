"""Bloom filter plans: the plan IR (:class:`BloomPlan`) and the compiler from a filter tree to it.

A plan is a postfix program over the bit rows of a :class:`~sterling.index.bloom.BloomIndex`;
:mod:`sterling.ops.plan_program` encodes plans for the kernels and evaluates them. The compiler
rewrites the filter into negation normal form and gives every leaf, positive or negated, a test
that is a *superset* of its exact answer, so the Bloom pass never drops an item that passes;
:attr:`BloomPlan.exact` says when the mask equals the filter's answer. The argument, leaf by leaf,
is in ``docs/bloom.md`` ("Exactness by design").

The compiler reads the index's layout through one record per feature: :class:`CategoricalBits`
(a dedicated bit row, :data:`HASHED` or :data:`ABSENT` per vocabulary value) and
:class:`NumericBuckets` (the value range of each bucket bit).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sterling.index.filter import And, Compare, FilterError, FilterNode, In, Not, Or, Term, Value, as_number

ABSENT = -2  # term_bits entry: no item holds the value (its term is exactly empty)
HASHED = -1  # term_bits entry: the value lives in the hashed region


@dataclass(frozen=True)
class BloomPlan:
    """A filter compiled for one :class:`~sterling.index.bloom.BloomIndex`: a postfix program over bit rows.

    Args:
        program (tuple): postfix ops. ``("all", idx)``: AND of the rows ``rows[i]`` for i in idx;
            ``("any", idx)``: their OR; ``("none", idx)``: NOT of their OR; ``("and", n)`` /
            ``("or", n)``: combine the top n results; ``("true", 0)`` / ``("false", 0)``: all
            ones / all zeros.
        rows (tuple[int, ...]): the bit rows the program reads (sorted, distinct).
        exact (bool): every leaf is exact, so the mask equals the filter's answer.
    """

    program: tuple[tuple[str, Any], ...]
    rows: tuple[int, ...]
    exact: bool

    @property
    def constant(self) -> bool | None:
        """True / False when the Bloom pass is all ones / all zeros (without reading bits)."""
        if len(self.program) == 1 and self.program[0][0] in ("true", "false"):
            return self.program[0][0] == "true"
        return None


@dataclass(frozen=True)
class CategoricalBits:
    """Where the terms of one categorical feature live.

    Args:
        name (str): the feature.
        index (int): its position among the store's features (the hash key).
        vocab (tuple): the vocabulary.
        term_bits (torch.Tensor): int32 [V]: each value's dedicated bit row, HASHED or ABSENT.
        lookup (dict): value -> vocabulary id.
    """

    name: str
    index: int
    vocab: tuple[Value, ...]
    term_bits: torch.Tensor
    lookup: dict[Value, int]


@dataclass(frozen=True)
class NumericBuckets:
    """The bucket bits of one numeric feature.

    Args:
        name (str): the feature.
        index (int): its position among the store's features.
        bit_offset (int): bucket ``b`` is bit row ``bit_offset + b``.
        lo (torch.Tensor): float64 [B]: the smallest value in each bucket.
        hi (torch.Tensor): float64 [B]: the largest value in each bucket.
    """

    name: str
    index: int
    bit_offset: int
    lo: torch.Tensor
    hi: torch.Tensor


@dataclass(frozen=True)
class _Node:
    """A plan node during compilation (negation normal form)."""

    op: str  # "true", "false", "all", "any", "none", "and", "or"
    exact: bool
    rows: tuple[int, ...] = ()
    children: tuple[_Node, ...] = ()


_TRUE = _Node("true", True)
_FALSE = _Node("false", True)
_UNKNOWN = _Node("true", False)


@dataclass(frozen=True)
class PlanCompiler:
    """Compiles filters for one Bloom layout.

    Args:
        features (Mapping[str, CategoricalBits | NumericBuckets]): the layout, by feature name.
        hashed_rows (Callable): ``(feature index, value ids int64 [T]) -> int64 [T, num_hashes]``,
            the bit rows of hashed terms.
    """

    features: Mapping[str, CategoricalBits | NumericBuckets]
    hashed_rows: Callable[[int, np.ndarray], np.ndarray]

    def compile(self, node: FilterNode, expr: str | None = None) -> BloomPlan:
        """The plan of ``node``, whose mask is a superset of the exact answer.

        Raises:
            FilterError: for an unknown feature or a comparison on a categorical feature (the
                same errors as :meth:`~sterling.index.attributes.AttributeStore.evaluate`).
        """
        root = self._compile(node, False, expr)
        rows = sorted({r for n in _walk(root) for r in n.rows})
        local = {r: i for i, r in enumerate(rows)}
        program: list[tuple[str, Any]] = []
        _emit(root, local, program)
        return BloomPlan(tuple(program), tuple(rows), root.exact)

    def _compile(self, node: FilterNode, negated: bool, expr: str | None) -> _Node:
        if isinstance(node, Not):
            return self._compile(node.child, not negated, expr)
        if isinstance(node, (And, Or)):
            op = "and" if isinstance(node, And) != negated else "or"  # De Morgan
            return _combine(op, [self._compile(c, negated, expr) for c in node.children])
        feature = self.features.get(node.feature)
        if feature is None:
            raise FilterError(
                f"unknown feature '{node.feature}' (known features: {', '.join(self.features) or '(none)'})",
                expr,
                node.pos,
            )
        if isinstance(feature, NumericBuckets):
            return _numeric_leaf(feature, node, negated)
        if isinstance(node, Compare):
            raise FilterError(f"feature '{node.feature}' is not numeric", expr, node.pos)
        values = (node.value,) if isinstance(node, Term) else node.values
        return self._categorical_leaf(feature, values, negated)

    def _categorical_leaf(self, feature: CategoricalBits, values: Sequence[Value], negated: bool) -> _Node:
        term_bits = feature.term_bits.numpy()
        dedicated: list[int] = []
        hashed: list[int] = []
        forms = [f for v in values for f in ((v, str(v)) if isinstance(v, int) else (v,))]
        for value in forms:  # as CategoricalColumn.matches: tag:2020 finds 2020 and "2020"
            vid = feature.lookup.get(value)
            if vid is None:
                continue
            bit = int(term_bits[vid])
            if bit >= 0:
                dedicated.append(bit)
            elif bit == HASHED:
                hashed.append(vid)
        if negated:  # AND of negated terms: ~bit exact, hashed unknown (all ones)
            return _leaf("none", dedicated, exact=not hashed)
        terms = [_leaf("any", dedicated, exact=True)]
        if hashed:
            positions = self.hashed_rows(feature.index, np.array(sorted(set(hashed)), dtype=np.int64))
            terms += [_leaf("all", p.tolist(), exact=False) for p in positions]
        return _combine("or", terms)


def _numeric_leaf(feature: NumericBuckets, node: Term | In | Compare, negated: bool) -> _Node:
    lo, hi = feature.lo.numpy(), feature.hi.numpy()  # [B] each, tiny: numpy is cheaper here
    if isinstance(node, Compare):
        x, op = float(node.number), node.op
        if op in (">=", ">"):
            test = np.greater_equal if op == ">=" else np.greater
            meets, inside = test(hi, x), test(lo, x)  # some / every value of a bucket
        elif op in ("<=", "<"):
            test = np.less_equal if op == "<=" else np.less
            meets, inside = test(lo, x), test(hi, x)
        else:
            holds, only = (lo <= x) & (x <= hi), (lo == x) & (hi == x)
            meets, inside = (holds, only) if op == "=" else (~only, ~holds)
    else:
        values = (node.value,) if isinstance(node, Term) else node.values
        points = np.array([x for x in map(as_number, values) if x is not None], np.float64)
        meets = ((lo[:, None] <= points) & (points <= hi[:, None])).any(1)
        inside = (lo == hi) & np.isin(lo, points)
    exact = not bool((meets & ~inside).any())
    rows = (feature.bit_offset + np.flatnonzero(inside if negated else meets)).tolist()
    return _leaf("none" if negated else "any", rows, exact)


def _leaf(op: str, rows: Sequence[int], exact: bool) -> _Node:
    """A leaf over ``rows``; an empty one folds to its constant."""
    rows = tuple(sorted(set(rows)))
    if not rows:
        return _Node("true" if op in ("all", "none") else "false", exact or op == "any")
    return _Node("any" if len(rows) == 1 and op == "all" else op, exact, rows)


def _combine(op: str, children: Sequence[_Node]) -> _Node:
    """AND / OR of nodes with constant folding and merging of mergeable leaves."""
    flat: list[_Node] = []
    for child in children:
        flat.extend(child.children if child.op == op else (child,))
    absorbing, neutral = ("false", "true") if op == "and" else ("true", "false")
    if any(c.op == absorbing and c.exact for c in flat):
        return _FALSE if op == "and" else _TRUE
    exact = all(c.exact for c in children)  # before flattening: a child's flag covers its own
    if any(c.op == absorbing for c in flat):  # an inexact "true" in an OR: all ones, unknown
        return _UNKNOWN
    # AND merges positions (all) and exclusions (none); OR merges alternatives (any).
    merge = {"all": "all", "none": "none"} if op == "and" else {"any": "any"}
    merged: dict[str, set[int]] = {}
    kept: list[_Node] = []
    for c in flat:
        if c.op == neutral:
            continue
        kind = "all" if op == "and" and c.op == "any" and len(c.rows) == 1 else c.op
        if kind in merge:
            merged.setdefault(kind, set()).update(c.rows)
        else:
            kept.append(c)
    kept += [_leaf(kind, rows, True) for kind, rows in merged.items()]
    if not kept:
        return _Node(neutral, exact)
    if len(kept) == 1:
        return dataclasses.replace(kept[0], exact=exact)
    return _Node(op, exact, children=tuple(kept))


def _walk(node: _Node) -> list[_Node]:
    out = [node]
    for child in node.children:
        out.extend(_walk(child))
    return out


def _emit(node: _Node, local: Mapping[int, int], program: list[tuple[str, Any]]) -> None:
    if node.op in ("true", "false"):
        program.append((node.op, 0))
    elif node.op in ("and", "or"):
        for child in node.children:
            _emit(child, local, program)
        program.append((node.op, len(node.children)))
    else:
        program.append((node.op, tuple(local[r] for r in node.rows)))
