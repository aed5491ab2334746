"""The exact forward index of item attributes, and exact filter evaluation over it.

Items carry attribute dicts such as ``{"genre": ["Drama", "War"], "year": 1995, "language": "en"}``.
A feature is *numeric* when every present value is a scalar int or float (bools excluded), and
*categorical* otherwise (strings and ints, single- or multi-valued). A missing key, ``None`` and an
empty list all mean the item lacks the feature.

Storage, for N items:

- categorical feature: a vocabulary (the distinct values present, ``str`` and ``int`` kept apart)
  and a CSR forward index: ``offsets`` int64 [N + 1] and ``value_ids`` int32 [nnz]; item ``i`` has
  the values ``vocab[value_ids[offsets[i]:offsets[i + 1]]]``.
- numeric feature: ``values`` float64 [N] (0 where missing) and ``present`` bool [N].

Evaluation is exact: ``Term`` / ``In`` on a categorical feature test membership (an int token also
matches its string form when the int itself is not in the vocabulary, so ``tag:2020`` finds
``"2020"``); on a numeric feature they and ``Compare`` test numerically and a missing value never
passes; ``NOT`` is the plain complement, so ``NOT year >= 1990`` keeps items without a year.
An unknown value matches nothing; an unknown feature is a :class:`FilterError`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sterling.index.filter import (
    And,
    Compare,
    FilterError,
    FilterNode,
    Not,
    Or,
    Term,
    Value,
    as_number,
    is_feature_name,
    parse,
)

_MAX_EXACT_INT = 2**53
_COMPARE: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    ">=": torch.ge,
    "<=": torch.le,
    ">": torch.gt,
    "<": torch.lt,
    "=": torch.eq,
    "!=": torch.ne,
}


def _normalise(item: int, feature: str, value: Any) -> Any:
    """One attribute value as None, a finite float, an int, a str, or a list of str/int."""
    where = f"item {item}, feature '{feature}'"
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        out = [_scalar(where, v) for v in value]
        if any(isinstance(v, float) for v in out):
            raise ValueError(f"{where}: list elements must be str or int, got a float in {value!r}")
        return out or None
    return _scalar(where, value)


def _scalar(where: str, value: Any) -> str | int | float:
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{where}: bool values are not supported, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        if not math.isfinite(value):
            raise ValueError(f"{where}: value must be finite, got {value!r}")
        return float(value)
    raise ValueError(
        f"{where}: unsupported value type {type(value).__name__} ({value!r}); "
        "use str, int, float or a list of str/int"
    )


@dataclass(frozen=True)
class CategoricalColumn:
    """One categorical feature.

    Args:
        vocab (tuple[str | int, ...]): the distinct values present in some item.
        offsets (torch.Tensor): int64 [N + 1], CSR row offsets into ``value_ids``.
        value_ids (torch.Tensor): int32 [nnz], positions in ``vocab``.
        multi (bool): whether values were given as lists (``decode`` returns lists).
    """

    vocab: tuple[Value, ...]
    offsets: torch.Tensor
    value_ids: torch.Tensor
    multi: bool
    lookup: dict[Value, int] = field(init=False, repr=False, compare=False)
    entry_rows: torch.Tensor = field(init=False, repr=False, compare=False)  # int64 [nnz]

    def __post_init__(self) -> None:
        lengths = self.offsets[1:] - self.offsets[:-1]
        object.__setattr__(self, "lookup", {v: i for i, v in enumerate(self.vocab)})
        object.__setattr__(
            self, "entry_rows", torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        )

    @staticmethod
    def empty() -> CategoricalColumn:
        return CategoricalColumn(
            (), torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int32), False
        )

    def extend(self, values: Sequence[list[Value]], multi: bool) -> CategoricalColumn:
        """Appends items; ``values[i]`` lists the values of new item ``i`` (empty if missing)."""
        lookup, vocab, ids = dict(self.lookup), list(self.vocab), []
        for item_values in values:
            for v in item_values:
                if v not in lookup:
                    lookup[v] = len(vocab)
                    vocab.append(v)
                ids.append(lookup[v])
        lengths = torch.tensor([len(v) for v in values], dtype=torch.int64)
        return CategoricalColumn(
            tuple(vocab),
            torch.cat([self.offsets, self.offsets[-1] + torch.cumsum(lengths, 0)]),
            torch.cat([self.value_ids, torch.tensor(ids, dtype=torch.int32)]),
            self.multi or multi,
        )

    def take(self, rows: torch.Tensor) -> CategoricalColumn:
        """The items at ``rows`` (int64 [M]); the vocabulary keeps only values still present."""
        lengths = (self.offsets[1:] - self.offsets[:-1])[rows]
        offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        shift = torch.repeat_interleave(self.offsets[:-1][rows] - offsets[:-1], lengths)
        ids = self.value_ids[shift + torch.arange(int(offsets[-1]))]
        used, ids = torch.unique(ids, return_inverse=True)
        vocab = tuple(self.vocab[i] for i in used.tolist())
        return CategoricalColumn(vocab, offsets, ids.to(torch.int32), self.multi)

    def matches(self, values: Iterable[Value]) -> torch.Tensor:
        """bool [N]: items having at least one of ``values``."""
        ids = set()
        for v in values:
            if v not in self.lookup and isinstance(v, int):
                v = str(v)
            if v in self.lookup:
                ids.add(self.lookup[v])
        mask = torch.zeros(len(self.offsets) - 1, dtype=torch.bool)
        if ids:
            hit = torch.isin(self.value_ids, torch.tensor(sorted(ids), dtype=torch.int32))
            mask[self.entry_rows[hit]] = True
        return mask

    def decode(self, row: int) -> Any:
        ids = self.value_ids[self.offsets[row] : self.offsets[row + 1]].tolist()
        if not ids:
            return None
        return [self.vocab[i] for i in ids] if self.multi else self.vocab[ids[0]]


@dataclass(frozen=True)
class NumericColumn:
    """One numeric feature.

    Args:
        values (torch.Tensor): float64 [N], 0 where missing.
        present (torch.Tensor): bool [N].
        integral (bool): whether every value was an int (``decode`` returns ints).
    """

    values: torch.Tensor
    present: torch.Tensor
    integral: bool

    @staticmethod
    def empty() -> NumericColumn:
        return NumericColumn(
            torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool), True
        )

    def extend(self, values: Sequence[int | float | None]) -> NumericColumn:
        """Appends items; ``values[i]`` is the value of new item ``i`` or None."""
        present = [v is not None for v in values]
        return NumericColumn(
            torch.cat(
                [
                    self.values,
                    torch.tensor([0.0 if v is None else v for v in values], dtype=torch.float64),
                ]
            ),
            torch.cat([self.present, torch.tensor(present, dtype=torch.bool)]),
            self.integral and all(isinstance(v, int) for v in values if v is not None),
        )

    def take(self, rows: torch.Tensor) -> NumericColumn:
        return NumericColumn(self.values[rows], self.present[rows], self.integral)

    def matches(self, values: Iterable[Value]) -> torch.Tensor:
        """bool [N]: items whose value equals one of ``values`` read as numbers."""
        numbers_ = [x for x in map(as_number, values) if x is not None]
        return self.present & torch.isin(self.values, torch.tensor(numbers_, dtype=torch.float64))

    def compare(self, op: str, number: float) -> torch.Tensor:
        return self.present & _COMPARE[op](self.values, float(number))

    def decode(self, row: int) -> Any:
        if not self.present[row]:
            return None
        value = float(self.values[row])
        return int(value) if self.integral else value


Column = CategoricalColumn | NumericColumn


def _normalise_rows(attributes: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validated rows with normalised values; missing values (None, []) are dropped."""
    if isinstance(attributes, (str, bytes, Mapping)) or not isinstance(attributes, Sequence):
        raise ValueError(f"attributes must be a list of dicts, got {type(attributes).__name__}")
    rows = []
    for item, row in enumerate(attributes):
        if not isinstance(row, Mapping):
            raise ValueError(f"item {item}: attributes must be a dict, got {type(row).__name__}")
        normalised = {}
        for name, value in row.items():
            if not is_feature_name(name):
                raise ValueError(
                    f"item {item}: feature name {name!r} cannot be used in filters; use a "
                    "non-empty str without whitespace or any of ():,&|!<>=\"' that is not "
                    "AND, OR or NOT"
                )
            value = _normalise(item, name, value)
            if value is not None:
                normalised[name] = value
        rows.append(normalised)
    return rows


@dataclass(frozen=True)
class AttributeStore:
    """The attributes of N items, column by column, with exact filter evaluation.

    Args:
        num_items (int): N.
        columns (Mapping[str, Column]): one column per feature, in first-seen order.

    Example::

        store = AttributeStore.build([{"genre": ["Drama", "War"], "year": 1995}, {"year": 2001}])
        store.evaluate_filter("genre:Drama OR year > 2000")  # tensor([True, True])
    """

    num_items: int
    columns: Mapping[str, Column]

    @staticmethod
    def build(attributes: Sequence[Mapping[str, Any]]) -> AttributeStore:
        """Builds the store of ``attributes`` (a list of N dicts), inferring each feature's kind."""
        rows = _normalise_rows(attributes)
        present: dict[str, list[Any]] = {}
        for row in rows:
            for name, value in row.items():
                present.setdefault(name, []).append(value)
        columns: dict[str, Column] = {
            name: NumericColumn.empty()
            if all(isinstance(v, (int, float)) for v in values)
            else CategoricalColumn.empty()
            for name, values in present.items()
        }
        return AttributeStore(0, columns)._extend(rows)

    def __len__(self) -> int:
        return self.num_items

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(self.columns)

    def append(self, attributes: Sequence[Mapping[str, Any]]) -> AttributeStore:
        """A new store with ``attributes`` (list of M dicts) appended as items N .. N + M - 1.

        Values new to a vocabulary extend it; a feature not in the store is an error.
        """
        return self._extend(_normalise_rows(attributes))

    def _extend(self, rows: list[dict[str, Any]]) -> AttributeStore:
        for item, row in enumerate(rows):
            for name in row:
                if name not in self.columns:
                    raise ValueError(
                        f"item {item}: unknown feature '{name}'; known features: "
                        f"{', '.join(self.columns) or '(none)'}"
                    )
        columns: dict[str, Column] = {}
        for name, column in self.columns.items():
            values = [row.get(name) for row in rows]
            if isinstance(column, NumericColumn):
                for item, v in enumerate(values):
                    _check_numeric(item, name, v)
                columns[name] = column.extend(values)
            else:
                for item, v in enumerate(values):
                    if isinstance(v, float):
                        raise ValueError(
                            f"item {item}, feature '{name}': float {v!r} in a categorical feature; "
                            "floats are only supported when every value of the feature is a number"
                        )
                columns[name] = column.extend(
                    [[] if v is None else v if isinstance(v, list) else [v] for v in values],
                    multi=any(isinstance(v, list) for v in values),
                )
        return AttributeStore(self.num_items + len(rows), columns)

    def take(self, rows: torch.Tensor) -> AttributeStore:
        """A new store of the items at ``rows`` (int64 [M]), in that order."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        return AttributeStore(len(rows), {n: c.take(rows) for n, c in self.columns.items()})

    def evaluate(self, node: FilterNode, expr: str | None = None) -> torch.Tensor:
        """Evaluates a parsed filter exactly.

        Args:
            node (FilterNode): the filter tree, from :func:`sterling.index.filter.parse`.
            expr (str | None): the filter text, shown in error messages.

        Returns:
            torch.Tensor: bool [N], the items passing the filter.

        Raises:
            FilterError: for an unknown feature or a comparison on a categorical feature.
        """
        if isinstance(node, Not):
            return ~self.evaluate(node.child, expr)
        if isinstance(node, (And, Or)):
            masks = [self.evaluate(child, expr) for child in node.children]
            combine = torch.logical_and if isinstance(node, And) else torch.logical_or
            out = masks[0]
            for mask in masks[1:]:
                out = combine(out, mask)
            return out
        column = self.columns.get(node.feature)
        if column is None:
            raise FilterError(
                f"unknown feature '{node.feature}' (known features: "
                f"{', '.join(self.columns) or '(none)'})",
                expr,
                node.pos,
            )
        if isinstance(node, Compare):
            if not isinstance(column, NumericColumn):
                raise FilterError(f"feature '{node.feature}' is not numeric", expr, node.pos)
            return column.compare(node.op, node.number)
        return column.matches((node.value,) if isinstance(node, Term) else node.values)

    def evaluate_filter(self, expr: str) -> torch.Tensor:
        """bool [N]: the items passing the filter expression ``expr``."""
        return self.evaluate(parse(expr), expr)

    def decode(self, rows: Iterable[int] | torch.Tensor) -> list[dict[str, Any]]:
        """The attribute dicts of the items at ``rows``, in the canonical form of the build input
        (missing features omitted; lists for features ever given as lists)."""
        out = []
        for row in torch.as_tensor(rows, dtype=torch.int64).reshape(-1).tolist():
            if not 0 <= row < self.num_items:
                raise IndexError(f"row {row} out of range for {self.num_items} items")
            decoded = {name: column.decode(row) for name, column in self.columns.items()}
            out.append({name: value for name, value in decoded.items() if value is not None})
        return out

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The column tensors, keyed ``"<feature>.offsets"``, ``".value_ids"``, ``".values"``,
        ``".present"``; with :meth:`meta` they make the whole store."""
        tensors = {}
        for name, column in self.columns.items():
            if isinstance(column, NumericColumn):
                tensors[f"{name}.values"] = column.values
                tensors[f"{name}.present"] = column.present
            else:
                tensors[f"{name}.offsets"] = column.offsets
                tensors[f"{name}.value_ids"] = column.value_ids
        return tensors

    def meta(self) -> dict[str, Any]:
        """JSON-serialisable description: item count, feature kinds and vocabularies."""
        features = []
        for name, column in self.columns.items():
            if isinstance(column, NumericColumn):
                features.append({"name": name, "kind": "numeric", "integral": column.integral})
            else:
                features.append(
                    {
                        "name": name,
                        "kind": "categorical",
                        "multi": column.multi,
                        "vocab": list(column.vocab),
                    }
                )
        return {"num_items": self.num_items, "features": features}

    @staticmethod
    def from_parts(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> AttributeStore:
        """Rebuilds a store from :meth:`meta` and :meth:`to_tensors`, checking their consistency."""
        try:
            n = int(meta["num_items"])
            specs = list(meta["features"])
            columns: dict[str, Column] = {}
            for spec in specs:
                name, kind = spec["name"], spec["kind"]
                if kind == "numeric":
                    columns[name] = NumericColumn(
                        _part(tensors, f"{name}.values", torch.float64, n),
                        _part(tensors, f"{name}.present", torch.bool, n),
                        bool(spec["integral"]),
                    )
                elif kind == "categorical":
                    columns[name] = _categorical_part(name, spec, tensors, n)
                else:
                    raise ValueError(f"feature '{name}' has unknown kind {kind!r}")
        except (KeyError, TypeError) as e:
            raise ValueError(f"attribute store meta is malformed: {e!r}") from None
        return AttributeStore(n, columns)

    def nbytes(self) -> int:
        """Bytes held: column tensors plus vocabulary values (str as UTF-8, int as 8 bytes)."""
        tensor_bytes = sum(t.numel() * t.element_size() for t in self.to_tensors().values())
        vocab_bytes = sum(
            len(v.encode()) if isinstance(v, str) else 8
            for c in self.columns.values()
            if isinstance(c, CategoricalColumn)
            for v in c.vocab
        )
        return tensor_bytes + vocab_bytes


def _check_numeric(item: int, name: str, value: Any) -> None:
    if value is None or isinstance(value, float):
        return
    if not isinstance(value, int):
        raise ValueError(
            f"item {item}, feature '{name}': the feature is numeric, "
            f"got {type(value).__name__} {value!r}"
        )
    if abs(value) > _MAX_EXACT_INT:
        raise ValueError(
            f"item {item}, feature '{name}': int {value} is too large to compare exactly as a "
            "number (|value| > 2**53); give the feature as strings"
        )


def _part(
    tensors: Mapping[str, torch.Tensor], key: str, dtype: torch.dtype, length: int
) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"attribute tensor '{key}' is missing")
    t = tensors[key]
    if t.dtype != dtype or t.dim() != 1 or (length >= 0 and len(t) != length):
        want = f"[{length}]" if length >= 0 else "[*]"
        raise ValueError(
            f"attribute tensor '{key}' should be {dtype} {want}, got {t.dtype} {list(t.shape)}"
        )
    return t


def _categorical_part(
    name: str, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], n: int
) -> CategoricalColumn:
    vocab = tuple(spec["vocab"])
    if any(isinstance(v, bool) or not isinstance(v, (str, int)) for v in vocab) or len(
        set(vocab)
    ) != len(vocab):
        raise ValueError(f"feature '{name}': vocabulary must hold distinct str/int values")
    offsets = _part(tensors, f"{name}.offsets", torch.int64, n + 1)
    value_ids = _part(tensors, f"{name}.value_ids", torch.int32, -1)
    if offsets[0] != 0 or offsets[-1] != len(value_ids) or bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(
            f"feature '{name}': offsets are not a valid CSR index into {len(value_ids)} values"
        )
    if len(value_ids) and (int(value_ids.min()) < 0 or int(value_ids.max()) >= len(vocab)):
        raise ValueError(f"feature '{name}': value ids outside the vocabulary of {len(vocab)}")
    return CategoricalColumn(vocab, offsets, value_ids, bool(spec["multi"]))
