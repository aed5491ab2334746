"""The Bloom index: a packed, transposed bit signature per item, evaluated by filter plans.

Built from an :class:`~sterling.index.attributes.AttributeStore` and a row order (the IVF's
cluster-sorted order; identity by default), it answers "which rows may pass this filter?" for
the whole index or for a few row ranges (the probed clusters, Algorithm 1 of the SilverTorch
spec), with 64 items per int64 operation.

Layout
------
``bits`` is int64 [n_bits, n_words], ``n_words = ceil(N / 64)``. Row ``p`` is one bit position;
word ``w`` of it holds that position for index rows ``64w .. 64w + 63``, index row ``64w + j`` in
bit ``j`` (least significant first; bit 63 is the sign bit). Index row ``r`` is store item
``order[r]``, so a contiguous row range (a cluster) is a contiguous run of words in every bit row::

    bit row   | word 0 (rows 0-63) | word 1 (rows 64-127) | ...
    ----------+--------------------+----------------------+
    0 .. D-1  | dedicated bits: one per frequent categorical (feature, value)
    D .. H-1  | numeric buckets: up to ``numeric_buckets`` per numeric feature
    H .. H+M-1| hashed region of width M: ``num_hashes`` positions per other term

The three kinds of bit:

- **Dedicated bits.** A categorical value held by at least ``dedicated_min_freq`` of the items
  gets its own un-hashed bit (most frequent first, at most ``dedicated_bits`` of them). Its term
  and its negation are exact. Frequent values are the right ones to dedicate: a dedicated bit
  costs 1 bit per item, hashing a value of frequency f costs about ``bits_per_term * f`` bits per
  item, and negating a rare value removes few items anyway (so "unknown" costs little there).
- **Numeric buckets.** Each numeric feature's present values are cut into at most
  ``numeric_buckets`` equal-frequency buckets at distinct-value boundaries (one bucket per value
  when there are few), each with its own bit; a missing value sets no bucket bit. A comparison is
  the OR of the buckets it touches (a superset; exact when no bucket straddles its boundary, e.g.
  always when every distinct value has its own bucket).
- **Hashed bits.** Every other categorical (feature, value) term sets ``num_hashes`` positions
  ``(h1 + j*h2) mod M`` (double hashing; h1, h2 from splitmix64 of the feature's index in the store
  and the value's vocabulary id, seeded: deterministic across processes and machines). A term
  tests the AND of its positions: a superset (a Bloom false positive is a collision).

**Width: global, not per bundle.** The official code sizes each 2,048-item bundle from its largest
item. We use one width for all items, ``M = max(ceil(bits_per_term * q), min_hashed_width)`` where
``q`` is the ``width_quantile`` (0.99) of the number of hashed terms per item. The floor (64 bits,
8 bytes per item) matters when items hold few hashed terms: sized from the term count alone, one
hashed term per item gives M = 10, whose false-positive rate (about 1% on average, and several
times that for values whose few positions collide with a frequent value's) is as large as the
selectivity of the 1% values being hashed, doubling the candidates a search must verify; at 64
bits it is about 1e-6. Reading a term costs ``num_hashes`` bit rows whatever the width. Reasons: the IVF order groups
items by embedding, not by term count, so per-bundle maxima sit near the global tail anyway; one
width means a term has the same positions in every block, so a probed range is a plain slice of
``num_hashes`` bit rows (no per-block modulo or gather); sizing from a quantile, not the maximum,
keeps a few items with many tags from widening everyone (those items only get more false
positives, which the exact check removes). Memory is ``(D + sum of buckets + M) / 8`` bytes per
item (:meth:`BloomIndex.bytes_per_item`, measured including the padding of the last word). With
about ``n`` hashed terms on an item, a hashed term's false-positive rate is about
``(1 - exp(-num_hashes * n / M)) ** num_hashes``: under 1% at 10 bits per term and 5 hashes.

Exactness by design
-------------------
The Bloom pass must return a **superset** of the rows passing the filter: it may keep rows that
fail (the exact check against the forward index removes them) but never drops one that passes.
Positive Bloom tests are supersets, and AND / OR of supersets are supersets, but ``NOT`` of a
superset is a *subset*: a collision on ``genre:Noir`` would make ``NOT genre:Noir`` drop an item
without Noir. So :meth:`BloomIndex.compile` rewrites the filter once into negation normal form
(De Morgan pushes NOT down to the leaves) and gives every leaf, positive or negated, a test that
is a superset of its exact answer:

- a categorical term: dedicated bit ``b`` (exact), AND of the hashed positions (superset), or
  EMPTY for a value no item holds (exact; an unknown value of a known feature matches nothing);
  negated: ``~b`` for a dedicated bit (exact), EMPTY negated = all ones (exact), and all ones
  ("unknown", not exact) for a hashed one;
- ``f IN (a, b)``: the OR of its terms; negated: the AND of the negated terms;
- a numeric ``Term`` / ``IN`` / comparison ``P``: the OR of the buckets whose value range meets
  ``P``; negated, ``NOT P`` holds for items missing the feature and items whose value fails
  ``P``, which is a subset of "not in a bucket lying wholly inside ``P``": ``~(OR of those
  buckets)``. So ``NOT year >= 1990`` keeps items without a year; exact when no bucket straddles.

Constants fold (``x AND EMPTY`` is EMPTY, exact), ANDs of positions and ORs of buckets merge, and
the plan records whether every leaf that remains is exact (:attr:`BloomPlan.exact`): then the
Bloom mask *is* the filter's answer and the search may skip the exact check. Unknown features
and comparisons on categorical features raise the same :class:`FilterError` as the store.

Cost
----
Plans are compiled once per distinct filter tree (cached per index) and run as a postfix program
of whole-tensor int64 AND / OR / NOT over the words of the requested ranges. The word
arithmetic is torch; per-query bookkeeping of ranges, bit unpacking and hashing use numpy, whose
per-call overhead on tiny arrays is far below torch's. Measured on 1,000,000 items of a Zipf
catalogue (143 bit rows, 17.9 bytes per item), 1 thread: build 1.5 s; a one-term plan over all
words 12 us, a 25-row plan 150 us; over 5% of the rows as 51 ranges 80-270 us (``words``) and
120-330 us (``mask`` / ``candidates``).

Example::

    store = AttributeStore.build([{"genre": ["Drama"], "year": 1995}, {"year": 1980}, {}])
    index = BloomIndex.build(store)
    plan = index.compile("NOT year >= 1990")
    index.mask(plan)            # tensor([False, True, True]); plan.exact is True
    index.mask(plan, [(1, 3)])  # tensor([True, True]): rows 1 and 2 only
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sterling.index.attributes import AttributeStore
from sterling.index.columns import CategoricalColumn, NumericColumn
from sterling.index.filter import (
    And,
    Compare,
    FilterError,
    FilterNode,
    In,
    Not,
    Or,
    Term,
    Value,
    as_number,
    parse,
)
from sterling.ops.cpu.bits import set_bits

FORMAT_VERSION = 1
_ABSENT = -2  # term_bits entry: no item holds the value (its term is exactly empty)
_HASHED = -1  # term_bits entry: the value lives in the hashed region
_PAIRS_PER_CHUNK = 1 << 22  # (bit, row) pairs set per pass during build; bounds build memory
_PLAN_CACHE = 4096  # compiled plans kept per index

Ranges = Sequence[tuple[int, int]] | torch.Tensor


@dataclass(frozen=True)
class BloomConfig:
    """Sizing of a :class:`BloomIndex`.

    Args:
        num_hashes (int): positions set (and tested) per hashed term, k.
        bits_per_term (float): hashed-region bits per hashed term of a typical item.
        width_quantile (float): the quantile of hashed terms per item the width is sized for.
        min_hashed_width (int): the hashed region is at least this wide (when anything is hashed).
        dedicated_bits (int): at most this many frequent categorical values get their own bit.
        dedicated_min_freq (float): a value needs at least this fraction of items to get one.
        numeric_buckets (int): at most this many range buckets (bits) per numeric feature.
        seed (int): hash seed.
    """

    num_hashes: int = 5
    bits_per_term: float = 10.0
    width_quantile: float = 0.99
    min_hashed_width: int = 64
    dedicated_bits: int = 64
    dedicated_min_freq: float = 0.02
    numeric_buckets: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("num_hashes", 1), ("dedicated_bits", 0), ("numeric_buckets", 1), ("min_hashed_width", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if not (isinstance(self.bits_per_term, (int, float)) and self.bits_per_term > 0):
            raise ValueError(f"bits_per_term must be > 0, got {self.bits_per_term!r}")
        for name in ("width_quantile", "dedicated_min_freq"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")


@dataclass(frozen=True)
class BloomPlan:
    """A filter compiled for one :class:`BloomIndex`: a postfix program over bit rows.

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
class _Node:
    """A plan node during compilation (negation normal form)."""

    op: str  # "true", "false", "all", "any", "none", "and", "or"
    exact: bool
    rows: tuple[int, ...] = ()
    children: tuple[_Node, ...] = ()


_TRUE = _Node("true", True)
_FALSE = _Node("false", True)
_UNKNOWN = _Node("true", False)


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


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser over a uint64 array (wrapping arithmetic)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def term_positions(feature: int, value_ids: torch.Tensor, width: int, num_hashes: int, seed: int = 0) -> torch.Tensor:
    """int64 [T, num_hashes]: the hashed positions in ``[0, width)`` of the terms
    ``(feature, value_ids[t])`` (the feature's index in the store, the value's vocabulary id)."""
    ids = np.asarray(value_ids, dtype=np.int64)
    return torch.from_numpy(_positions(feature, ids, width, num_hashes, seed))


def _positions(feature: int, value_ids: np.ndarray, width: int, num_hashes: int, seed: int) -> np.ndarray:
    """:func:`term_positions` in numpy: int64 [T, num_hashes]."""
    key = (np.uint64(feature) << np.uint64(32)) | value_ids.reshape(-1).astype(np.uint64)
    h1 = _splitmix64(key ^ _splitmix64(np.full(key.shape, seed, dtype=np.uint64)))
    h2 = _splitmix64(h1) | np.uint64(1)
    j = np.arange(num_hashes, dtype=np.uint64)
    positions = (h1[:, None] + j[None, :] * h2[:, None]) % np.uint64(width)
    return positions.astype(np.int64)


@dataclass(frozen=True)
class _Categorical:
    name: str
    index: int  # position among the store's features: the hash key
    vocab: tuple[Value, ...]
    term_bits: torch.Tensor  # int32 [V]: dedicated bit row, _HASHED or _ABSENT
    lookup: dict[Value, int]


@dataclass(frozen=True)
class _Numeric:
    name: str
    index: int
    bit_offset: int  # bucket b is bit row bit_offset + b
    lo: torch.Tensor  # float64 [B]: smallest value in each bucket
    hi: torch.Tensor  # float64 [B]: largest value in each bucket


@dataclass(frozen=True)
class _Spans:
    """The words covering a list of row ranges, range by range."""

    cols: slice | torch.Tensor  # the covering words: one slice, or int64 [W]
    word_index: np.ndarray  # int64 [W]: the index of each covering word
    keep: np.ndarray  # int64 [W]: 1 bits at the rows inside the ranges
    num_words: int  # W


class BloomIndex:
    """A Bloom filter index over the attributes of N items, stored transposed (see the module
    docstring for the layout and the exactness argument).

    Args:
        bits (torch.Tensor): int64 [n_bits, ceil(N / 64)].
        num_rows (int): N.
        features (list): per-feature compiled state, in store order.
        hashed_base (int): first bit row of the hashed region.
        hashed_width (int): M, the hashed region's width (0 when nothing is hashed).
        config (BloomConfig): the build configuration.

    Use :meth:`build` or :meth:`from_parts` rather than the constructor.
    """

    def __init__(
        self,
        bits: torch.Tensor,
        num_rows: int,
        features: Sequence[_Categorical | _Numeric],
        hashed_base: int,
        hashed_width: int,
        config: BloomConfig,
    ) -> None:
        self._bits = bits
        self._num_rows = num_rows
        self._features = {f.name: f for f in features}
        self._hashed_base = hashed_base
        self._hashed_width = hashed_width
        self._config = config
        self._plans: dict[FilterNode, BloomPlan] = {}  # compiled plans, by filter tree
        self._all_rows = _spans(np.array([[0, num_rows]], dtype=np.int64), num_rows)

    # ---- build -------------------------------------------------------------------------------

    @staticmethod
    def build(
        store: AttributeStore,
        order: torch.Tensor | None = None,
        config: BloomConfig = BloomConfig(),
    ) -> BloomIndex:
        """Builds the index of ``store`` with index row ``r`` holding store item ``order[r]``.

        Args:
            store (AttributeStore): the exact attributes of N items.
            order (torch.Tensor | None): int64 [N], a permutation of the store's items (the IVF's
                cluster-sorted order); None for the identity.
            config (BloomConfig): sizing.

        Returns:
            BloomIndex: ``bytes_per_item()`` is about ``(D + buckets + M) / 8``.
        """
        n = store.num_items
        if order is None:
            inverse = torch.arange(n, dtype=torch.int64)
        else:
            order = torch.as_tensor(order, dtype=torch.int64).reshape(-1)
            if len(order) != n or not torch.equal(torch.sort(order).values, torch.arange(n)):
                raise ValueError(f"order must be a permutation of the {n} store items")
            inverse = torch.empty(n, dtype=torch.int64)
            inverse[order] = torch.arange(n, dtype=torch.int64)

        columns = list(store.columns.items())
        categorical = [(i, name, c) for i, (name, c) in enumerate(columns) if isinstance(c, CategoricalColumn)]
        term_bits = _assign_dedicated(categorical, n, config)

        features: list[_Categorical | _Numeric] = []
        bit_row = sum(int((t >= 0).sum()) for t in term_bits.values())  # dedicated rows first
        buckets: dict[str, torch.Tensor] = {}  # name -> int64 [N] bucket of each item, -1 missing
        for i, (name, column) in enumerate(columns):
            if isinstance(column, NumericColumn):
                lo, hi, bucket = _numeric_buckets(column, config.numeric_buckets)
                features.append(_Numeric(name, i, bit_row, lo, hi))
                buckets[name] = bucket
                bit_row += len(lo)
            else:
                tb = term_bits[name]
                features.append(_Categorical(name, i, column.vocab, tb, _lookup(column.vocab)))
        hashed_base = bit_row

        hashed_per_item = torch.zeros(n, dtype=torch.int64)
        for _, name, column in categorical:
            entry_rows, entry_ids = column.entries()  # computed on the fly, not stored
            hashed = term_bits[name][entry_ids] == _HASHED
            hashed_per_item += torch.bincount(entry_rows[hashed], minlength=n)
        width = 0
        if int(hashed_per_item.sum()) > 0:
            sorted_counts = torch.sort(hashed_per_item).values
            q = int(sorted_counts[min(n - 1, math.ceil(config.width_quantile * (n - 1)))])
            width = max(math.ceil(config.bits_per_term * max(q, 1)), config.num_hashes, config.min_hashed_width)

        bits = torch.zeros(hashed_base + width, (n + 63) // 64, dtype=torch.int64)
        for feature in features:
            if isinstance(feature, _Numeric):
                bucket = buckets[feature.name]
                items = torch.nonzero(bucket >= 0).squeeze(1)
                _set_bits(bits, feature.bit_offset + bucket[items], inverse[items])
                continue
            column = store.columns[feature.name]
            assert isinstance(column, CategoricalColumn)
            entry_rows, entry_ids = column.entries()
            tb = feature.term_bits[entry_ids]
            dedicated = tb >= 0
            _set_bits(bits, tb[dedicated].long(), inverse[entry_rows[dedicated]])
            hashed = torch.nonzero(tb == _HASHED).squeeze(1)
            if len(hashed) == 0:
                continue
            table = hashed_base + term_positions(
                feature.index,
                torch.arange(len(feature.vocab)),
                width,
                config.num_hashes,
                config.seed,
            )  # [V, k]
            step = max(1, _PAIRS_PER_CHUNK // config.num_hashes)
            for start in range(0, len(hashed), step):
                entries = hashed[start : start + step]
                rows = inverse[entry_rows[entries]]
                positions = table[entry_ids[entries]]  # [E, k]
                rows = rows.unsqueeze(1).expand(-1, config.num_hashes)
                _set_bits(bits, positions.reshape(-1), rows.reshape(-1))
        return BloomIndex(bits, n, features, hashed_base, width, config)

    # ---- properties --------------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return self._num_rows

    def __len__(self) -> int:
        return self._num_rows

    @property
    def bits(self) -> torch.Tensor:
        """int64 [n_bits, ceil(N / 64)], the transposed signatures (read-only by convention)."""
        return self._bits

    @property
    def config(self) -> BloomConfig:
        return self._config

    def layout(self) -> dict[str, int]:
        """Bit rows by kind: ``dedicated``, ``numeric`` (buckets), ``hashed`` (M) and ``total``."""
        numeric = sum(len(f.lo) for f in self._features.values() if isinstance(f, _Numeric))
        return {
            "dedicated": self._hashed_base - numeric,
            "numeric": numeric,
            "hashed": self._hashed_width,
            "total": self._bits.shape[0],
        }

    def nbytes(self) -> int:
        """Bytes of the bit matrix plus the per-term and per-bucket tables."""
        total = self._bits.numel() * 8
        for f in self._features.values():
            if isinstance(f, _Numeric):
                total += f.lo.numel() * 8 + f.hi.numel() * 8
            else:
                total += f.term_bits.numel() * 4
        return total

    def bytes_per_item(self) -> float:
        """Bytes of the bit matrix per item: ``n_bits / 8`` plus the last word's padding."""
        return self._bits.numel() * 8 / max(self._num_rows, 1)

    # ---- compile -----------------------------------------------------------------------------

    def compile(self, node: FilterNode | str, expr: str | None = None) -> BloomPlan:
        """Compiles a filter into a plan whose mask is a superset of the exact answer.

        Args:
            node (FilterNode | str): a parsed filter, or its text (parsed here).
            expr (str | None): the filter text, shown in error messages.

        Raises:
            FilterError: for a syntax error, an unknown feature or a comparison on a categorical
                feature (the same errors as :meth:`AttributeStore.evaluate`).
        """
        if isinstance(node, str):
            expr, node = node, parse(node)
        plan = self._plans.get(node)
        if plan is None:
            root = self._compile(node, False, expr)
            rows = sorted({r for n in _walk(root) for r in n.rows})
            local = {r: i for i, r in enumerate(rows)}
            program: list[tuple[str, Any]] = []
            _emit(root, local, program)
            plan = BloomPlan(tuple(program), tuple(rows), root.exact)
            if len(self._plans) >= _PLAN_CACHE:
                self._plans.clear()
            self._plans[node] = plan
        return plan

    def _compile(self, node: FilterNode, negated: bool, expr: str | None) -> _Node:
        if isinstance(node, Not):
            return self._compile(node.child, not negated, expr)
        if isinstance(node, (And, Or)):
            op = "and" if isinstance(node, And) != negated else "or"  # De Morgan
            return _combine(op, [self._compile(c, negated, expr) for c in node.children])
        feature = self._features.get(node.feature)
        if feature is None:
            raise FilterError(
                f"unknown feature '{node.feature}' (known features: {', '.join(self._features) or '(none)'})",
                expr,
                node.pos,
            )
        if isinstance(feature, _Numeric):
            return self._numeric_leaf(feature, node, negated)
        if isinstance(node, Compare):
            raise FilterError(f"feature '{node.feature}' is not numeric", expr, node.pos)
        values = (node.value,) if isinstance(node, Term) else node.values
        return self._categorical_leaf(feature, values, negated)

    def _categorical_leaf(self, feature: _Categorical, values: Sequence[Value], negated: bool) -> _Node:
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
            elif bit == _HASHED:
                hashed.append(vid)
        if negated:  # AND of negated terms: ~bit exact, hashed unknown (all ones)
            return _leaf("none", dedicated, exact=not hashed)
        terms = [_leaf("any", dedicated, exact=True)]
        if hashed:
            positions = self._hashed_base + _positions(
                feature.index,
                np.array(sorted(set(hashed)), dtype=np.int64),
                self._hashed_width,
                self._config.num_hashes,
                self._config.seed,
            )
            terms += [_leaf("all", p.tolist(), exact=False) for p in positions]
        return _combine("or", terms)

    def _numeric_leaf(self, feature: _Numeric, node: Term | In | Compare, negated: bool) -> _Node:
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

    # ---- evaluate ----------------------------------------------------------------------------

    def words(self, plan: BloomPlan, ranges: Ranges | None = None) -> torch.Tensor:
        """The plan's result as packed words.

        Args:
            plan (BloomPlan): from :meth:`compile` on this index.
            ranges (Sequence[tuple[int, int]] | torch.Tensor | None): row ranges
                ``[start, end)`` (e.g. the probed clusters), or None for all rows.

        Returns:
            torch.Tensor: int64 [W], for each range in turn its covering words
            ``start // 64 .. (end - 1) // 64`` (none for an empty range); bit ``j`` of the
            range's ``i``-th word is row ``64 * (start // 64 + i) + j``; bits of rows outside the
            range are 0.
        """
        return self._words(plan, self._spans(ranges))

    def mask(self, plan: BloomPlan, ranges: Ranges | None = None) -> torch.Tensor:
        """bool [sum of range lengths] (or [N]): the rows of each range in turn that may pass."""
        spans = self._spans(ranges)
        bits = _unpack(self._words(plan, spans))  # [W * 64]
        out = bits[: self._num_rows] if ranges is None else bits[_unpack(spans.keep)]
        return torch.from_numpy(out.copy())

    def candidates(self, plan: BloomPlan, ranges: Ranges | None = None) -> torch.Tensor:
        """int64 [C]: the rows (index order) that may pass, range by range, ascending within."""
        spans = self._spans(ranges)
        hits = set_bits(self._words(plan, spans))  # positions in the words
        return torch.from_numpy(spans.word_index[hits >> 6] * 64 + (hits & 63))

    def _words(self, plan: BloomPlan, spans: _Spans) -> torch.Tensor:
        out = self._run(plan, spans)
        out &= torch.from_numpy(spans.keep)
        return out

    def _spans(self, ranges: Ranges | None) -> _Spans:
        if ranges is None:
            return self._all_rows
        if isinstance(ranges, torch.Tensor):
            r = ranges.detach().to(torch.int64).reshape(-1, 2).numpy()
        else:
            r = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
        return _spans(r, self._num_rows)

    def _run(self, plan: BloomPlan, spans: _Spans) -> torch.Tensor:
        """int64 [W]: the program over the covering words (bits outside the ranges undefined)."""
        w = spans.num_words
        if isinstance(spans.cols, slice):
            view = self._bits[:, spans.cols]
            rows = [view[r] for r in plan.rows]
        else:
            index = torch.tensor(plan.rows, dtype=torch.int64)
            gathered = self._bits[index.unsqueeze(1), spans.cols.unsqueeze(0)]  # [R, W]
            rows = list(gathered.unbind(0))
        stack: list[torch.Tensor] = []
        for op, arg in plan.program:
            if op == "true":
                stack.append(torch.full((w,), -1, dtype=torch.int64))
            elif op == "false":
                stack.append(torch.zeros(w, dtype=torch.int64))
            elif op in ("and", "or"):
                parts = stack[-arg:]
                del stack[-arg:]
                acc = parts[0]
                for part in parts[1:]:
                    if op == "and":
                        acc &= part
                    else:
                        acc |= part
                stack.append(acc)
            else:
                acc = rows[arg[0]].clone()
                for i in arg[1:]:
                    if op == "all":
                        acc &= rows[i]
                    else:
                        acc |= rows[i]
                stack.append(acc.bitwise_not_() if op == "none" else acc)
        (result,) = stack
        return result

    # ---- snapshot ----------------------------------------------------------------------------

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """``bits``, ``term_bits`` (int32, categorical features concatenated), ``bucket_lo`` and
        ``bucket_hi`` (float64, numeric features concatenated); with :meth:`meta`, the index."""
        cats = [f.term_bits for f in self._features.values() if isinstance(f, _Categorical)]
        nums = [f for f in self._features.values() if isinstance(f, _Numeric)]
        return {
            "bits": self._bits,
            "term_bits": torch.cat([torch.zeros(0, dtype=torch.int32), *cats]),
            "bucket_lo": torch.cat([torch.zeros(0, dtype=torch.float64)] + [f.lo for f in nums]),
            "bucket_hi": torch.cat([torch.zeros(0, dtype=torch.float64)] + [f.hi for f in nums]),
        }

    def meta(self) -> dict[str, Any]:
        """JSON-serialisable description: format, row count, config, layout and vocabularies."""
        features = []
        for f in self._features.values():
            if isinstance(f, _Numeric):
                features.append(
                    {"name": f.name, "kind": "numeric", "index": f.index,
                     "bit_offset": f.bit_offset, "buckets": len(f.lo)}
                )  # fmt: skip
            else:
                features.append(
                    {"name": f.name, "kind": "categorical", "index": f.index,
                     "vocab": list(f.vocab)}
                )  # fmt: skip
        return {
            "format": FORMAT_VERSION,
            "num_rows": self._num_rows,
            "config": dataclasses.asdict(self._config),
            "hashed_base": self._hashed_base,
            "hashed_width": self._hashed_width,
            "features": features,
        }

    @staticmethod
    def from_parts(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> BloomIndex:
        """Rebuilds an index from :meth:`meta` and :meth:`to_tensors`, checking consistency."""
        try:
            if meta["format"] != FORMAT_VERSION:
                raise ValueError(f"unsupported Bloom index format {meta['format']!r}")
            n = int(meta["num_rows"])
            config = BloomConfig(**meta["config"])
            base, width = int(meta["hashed_base"]), int(meta["hashed_width"])
            bits, term_bits = tensors["bits"], tensors["term_bits"]
            lo, hi = tensors["bucket_lo"], tensors["bucket_hi"]
            if bits.dtype != torch.int64 or tuple(bits.shape) != (base + width, (n + 63) // 64):
                raise ValueError(f"bits should be int64 [{base + width}, {(n + 63) // 64}]")
            if term_bits.dtype != torch.int32 or lo.dtype != torch.float64 or hi.shape != lo.shape:
                raise ValueError("term_bits must be int32, bucket_lo/hi float64 of one shape")
            features: list[_Categorical | _Numeric] = []
            t = b = 0
            for spec in meta["features"]:
                name, index = str(spec["name"]), int(spec["index"])
                if spec["kind"] == "numeric":
                    k, offset = int(spec["buckets"]), int(spec["bit_offset"])
                    if b + k > len(lo) or not 0 <= offset <= offset + k <= base:
                        raise ValueError(f"feature '{name}': buckets out of range")
                    features.append(_Numeric(name, index, offset, lo[b : b + k], hi[b : b + k]))
                    b += k
                elif spec["kind"] == "categorical":
                    vocab = tuple(spec["vocab"])
                    tb = term_bits[t : t + len(vocab)]
                    bad = len(tb) > 0 and (int(tb.min()) < _ABSENT or int(tb.max()) >= base)
                    if len(tb) != len(vocab) or bad:
                        raise ValueError(f"feature '{name}': term bits do not match its vocabulary")
                    features.append(_Categorical(name, index, vocab, tb, _lookup(vocab)))
                    t += len(vocab)
                else:
                    raise ValueError(f"feature '{name}' has unknown kind {spec['kind']!r}")
            if t != len(term_bits) or b != len(lo):
                raise ValueError("term_bits / bucket tensors have entries no feature owns")
        except (KeyError, TypeError) as e:
            raise ValueError(f"Bloom index meta is malformed: {e!r}") from None
        return BloomIndex(bits, n, features, base, width, config)


# ---- helpers ---------------------------------------------------------------------------------


def _lookup(vocab: Sequence[Value]) -> dict[Value, int]:
    return {v: i for i, v in enumerate(vocab)}


def _assign_dedicated(
    categorical: Sequence[tuple[int, str, CategoricalColumn]], n: int, config: BloomConfig
) -> dict[str, torch.Tensor]:
    """int32 [V_f] per categorical feature: a dedicated bit row, _HASHED or _ABSENT. The most
    frequent values (ties by feature, then vocabulary id) at or above the threshold get bits."""
    # items holding each value; a value listed twice on one item counts once
    counts = [column.item_counts() for _, _, column in categorical]
    term_bits = [torch.where(c > 0, _HASHED, _ABSENT).to(torch.int32) for c in counts]
    names = [name for _, name, _ in categorical]
    if not counts or config.dedicated_bits == 0:
        return dict(zip(names, term_bits))
    count = torch.cat(counts)
    feature = torch.cat([torch.full((len(c),), i) for i, c in enumerate(counts)])
    vid = torch.cat([torch.arange(len(c)) for c in counts])
    threshold = max(1, math.ceil(config.dedicated_min_freq * n))
    eligible = torch.nonzero(count >= threshold).squeeze(1).numpy()
    # sort by count descending, then feature, then value id (deterministic)
    chosen = eligible[np.lexsort((vid.numpy()[eligible], feature.numpy()[eligible], -count.numpy()[eligible]))][
        : config.dedicated_bits
    ]
    for bit, j in enumerate(chosen.tolist()):
        term_bits[int(feature[j])][int(vid[j])] = bit
    return dict(zip(names, term_bits))


def _numeric_buckets(column: NumericColumn, max_buckets: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lo float64 [B], hi float64 [B], bucket int64 [N], -1 where missing): equal-frequency
    buckets whose boundaries fall between distinct values."""
    present = column.present
    values = column.values[present]
    uniq, counts = torch.unique(values, return_counts=True)  # sorted
    if len(uniq) <= max_buckets:
        of_unique = torch.arange(len(uniq))
    else:
        before = torch.cumsum(counts, 0) - counts
        raw = before * max_buckets // len(values)  # non-decreasing in [0, max_buckets)
        of_unique = torch.unique_consecutive(raw, return_inverse=True)[1]
    num = int(of_unique[-1]) + 1 if len(uniq) else 0
    first = torch.full((num,), len(uniq), dtype=torch.int64).scatter_reduce(
        0, of_unique, torch.arange(len(uniq)), "amin"
    )
    last = torch.zeros(num, dtype=torch.int64).scatter_reduce(0, of_unique, torch.arange(len(uniq)), "amax")
    bucket = torch.full((len(present),), -1, dtype=torch.int64)
    bucket[present] = of_unique[torch.searchsorted(uniq, values)]
    return uniq[first], uniq[last], bucket


def _set_bits(bits: torch.Tensor, bit_rows: torch.Tensor, rows: torch.Tensor) -> None:
    """Sets bit (bit_rows[i], rows[i]) of ``bits`` (int64 [n_bits, n_words]) for every i."""
    if len(rows) == 0:
        return
    n_words = bits.shape[1]
    keys = torch.unique(bit_rows.long() * (n_words * 64) + rows)  # distinct (bit row, row) pairs
    word = keys >> 6  # == bit_row * n_words + row // 64
    acc = torch.zeros(bits.numel(), dtype=torch.int64)
    acc.index_add_(0, word, torch.ones_like(keys) << (keys & 63))  # distinct bits: sum == OR
    bits.view(-1).bitwise_or_(acc)


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


def _spans(r: np.ndarray, n: int) -> _Spans:
    """The words covering the row ranges ``r`` (int64 [R, 2]), computed in numpy: a handful of
    tiny ops per query, where torch's per-op overhead would dominate."""
    starts, ends = r[:, 0], r[:, 1]
    if bool(((starts < 0) | (ends < starts) | (ends > n)).any()):
        raise ValueError(f"ranges must satisfy 0 <= start <= end <= {n}")
    nonempty = ends > starts
    starts, ends = starts[nonempty], ends[nonempty]
    first_word, end_word = starts // 64, (ends + 63) // 64
    counts = end_word - first_word
    offsets = np.cumsum(counts) - counts  # each range's first word in the output
    total = int(counts.sum())
    word_index = np.repeat(first_word - offsets, counts) + np.arange(total, dtype=np.int64)
    keep = np.full(total, -1, dtype=np.int64)
    keep[offsets] &= np.left_shift(np.int64(-1), starts - 64 * first_word)
    high = ends - 64 * (end_word - 1)  # rows kept in the last word, 1..64
    keep[offsets + counts - 1] &= np.where(
        high == 64, np.int64(-1), np.left_shift(np.int64(1), np.minimum(high, 63)) - 1
    )
    if len(starts) <= 1:
        w0 = int(first_word[0]) if len(starts) else 0
        cols: slice | torch.Tensor = slice(w0, w0 + total)
    else:
        cols = torch.from_numpy(word_index)
    return _Spans(cols, word_index, keep, total)


def _unpack(words: torch.Tensor | np.ndarray) -> np.ndarray:
    """bool [W * 64]: bit ``j`` of word ``w`` at ``64 * w + j`` (numpy's unpackbits is ~25x
    faster than torch shifts here)."""
    array = words.numpy() if isinstance(words, torch.Tensor) else words
    little = np.ascontiguousarray(array).astype("<i8", copy=False)
    return np.unpackbits(little.view(np.uint8), bitorder="little").view(np.bool_)
