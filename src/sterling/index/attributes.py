"""The exact forward index of item attributes, and exact filter evaluation over it.

Items carry attribute dicts such as ``{"genre": ["Drama", "War"], "year": 1995, "language": "en"}``.
A feature is *numeric* when every present value is a scalar int or float (bools excluded), and
*categorical* otherwise (strings and ints, single- or multi-valued). A missing key, ``None`` and an
empty list all mean the item lacks the feature. Each feature is stored as one column of
:mod:`sterling.index.columns` (compact: about one byte per item for a single-valued feature with a
small vocabulary; nothing derived is kept).

:meth:`AttributeStore.nbytes` counts every tensor held and the vocabulary objects (each value,
the tuple and the lookup dict, as ``sys.getsizeof`` reports them).

Evaluation is exact: ``Term`` / ``In`` on a categorical feature test membership (an unquoted int
token matches the int and its decimal string form, so ``tag:2020`` finds both ``2020`` and
``"2020"``; the answer never depends on which other values the vocabulary holds); on a numeric
feature they and ``Compare`` test numerically and a missing value never passes; ``NOT`` is the
plain complement, so ``NOT year >= 1990`` keeps items without a year.
An unknown value matches nothing; an unknown feature is a :class:`FilterError`.
:meth:`AttributeStore.evaluate_rows` evaluates a filter on some rows only, reading only the
features the filter names.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import torch

from sterling.index.columns import CategoricalColumn, Column, NumericColumn
from sterling.index.filter import (
    And,
    Compare,
    FilterError,
    FilterNode,
    Not,
    Or,
    Term,
    is_feature_name,
    parse,
)
from sterling.ops.kernel import host

_MAX_EXACT_INT = 2**53
_SCALAR_TYPES = frozenset({str, int, float, type(None)})


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
        f"{where}: unsupported value type {type(value).__name__} ({value!r}); use str, int, float or a list of str/int"
    )


def _normalise_rows(attributes: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validated rows with normalised values; missing values (None, []) are dropped. Item by
    item: the reference that decides which error a bad input raises first."""
    _check_sequence(attributes)
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


def _check_sequence(attributes: object) -> None:
    if isinstance(attributes, (str, bytes, Mapping)) or not isinstance(attributes, Sequence):
        raise ValueError(f"attributes must be a list of dicts, got {type(attributes).__name__}")


def _normalise_column(name: str, raw: list[Any]) -> list[Any] | None:
    """The normalised values of one feature (None where missing), or None if some value is
    invalid (the caller then finds the first error item by item)."""
    types = set(map(type, raw))
    if types <= _SCALAR_TYPES:  # plain str / int / float / None: already normal
        if float in types and not all(math.isfinite(v) for v in raw if type(v) is float):
            return None
        return raw
    if types <= _SCALAR_TYPES | {list} and float not in types:
        lists = chain.from_iterable(v for v in raw if type(v) is list)
        if set(map(type, lists)) <= {str, int}:  # lists of plain str / int: [] is missing
            return [None if type(v) is list and not v else v for v in raw]
    out = []
    try:
        for item, v in enumerate(raw):
            t = type(v)
            if t is str or t is int or v is None:
                out.append(v)
            elif t is list and v and all(type(x) is str for x in v):
                out.append(v)
            else:
                out.append(_normalise(item, name, v))
    except ValueError:
        return None
    return out


def _normalised_columns(attributes: Sequence[Mapping[str, Any]]) -> tuple[int, dict[str, list]]:
    """(M, feature -> normalised values [M], None where missing) for the features present in
    some item, in first-seen order (by the first item holding a value, then that item's key
    order). Raises the error the item-by-item :func:`_normalise_rows` raises first."""
    _check_sequence(attributes)
    names: dict[Any, None] = {}
    if set(map(type, attributes)) <= {dict}:
        update = names.update
        for row in attributes:
            update(row)  # keys in first-seen order; the values are not used
    elif all(isinstance(row, Mapping) for row in attributes):
        for row in attributes:
            names.update(dict.fromkeys(row))
    else:
        return _columns_of_rows(_normalise_rows(attributes))
    raw = {name: [row.get(name) for row in attributes] for name in names}
    columns: dict[str, list] = {}
    for name in names:
        normalised = _normalise_column(name, raw[name]) if is_feature_name(name) else None
        if normalised is None:
            return _columns_of_rows(_normalise_rows(attributes))  # raises the first error
        columns[name] = normalised
    first = {}
    for name, values in columns.items():
        i = next((i for i, v in enumerate(values) if v is not None), -1)
        if i >= 0:
            first[name] = (i, list(attributes[i]).index(name))
    return len(attributes), {name: columns[name] for name in sorted(first, key=first.__getitem__)}


def _columns_of_rows(rows: list[dict[str, Any]]) -> tuple[int, dict[str, list]]:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    return len(rows), {name: [row.get(name) for row in rows] for name in names}


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
        m, values = _normalised_columns(attributes)
        columns: dict[str, Column] = {
            name: NumericColumn.empty()
            if set(map(type, vals)) <= {int, float, type(None)}
            else CategoricalColumn.empty()
            for name, vals in values.items()
        }
        return AttributeStore(0, columns)._extend(m, values)

    def __len__(self) -> int:
        return self.num_items

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(self.columns)

    def append(self, attributes: Sequence[Mapping[str, Any]]) -> AttributeStore:
        """A new store with ``attributes`` (list of M dicts) appended as items N .. N + M - 1.

        Values new to a vocabulary extend it; a feature not in the store is an error.
        """
        return self._extend(*_normalised_columns(attributes))

    def _extend(self, m: int, values: Mapping[str, list[Any]]) -> AttributeStore:
        """Appends M items given as feature -> normalised values [M] (None where missing)."""
        for name, vals in values.items():  # in first-seen order: the first unknown one fails
            if name not in self.columns:
                item = next(i for i, v in enumerate(vals) if v is not None)
                raise ValueError(
                    f"item {item}: unknown feature '{name}'; known features: {', '.join(self.columns) or '(none)'}"
                )
        columns: dict[str, Column] = {}
        for name, column in self.columns.items():
            vals = values.get(name)
            if vals is None:
                vals = [None] * m
            types = set(map(type, vals))
            if isinstance(column, NumericColumn):
                ints = [v for v in vals if type(v) is int] if int in types else []
                if not types <= {int, float, type(None)} or (ints and max(max(ints), -min(ints)) > _MAX_EXACT_INT):
                    for item, v in enumerate(vals):
                        _check_numeric(item, name, v)
                columns[name] = column.extend(vals)
            else:
                if float in types:
                    item, v = next((i, v) for i, v in enumerate(vals) if type(v) is float)
                    raise ValueError(
                        f"item {item}, feature '{name}': float {v!r} in a categorical feature; "
                        "floats are only supported when every value of the feature is a number"
                    )
                columns[name] = column.extend(vals, multi=list in types)
        return AttributeStore(self.num_items + m, columns)

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
        return self._evaluate(node, expr, lambda name, column: column)

    def evaluate_rows(self, node: FilterNode, rows: torch.Tensor, expr: str | None = None) -> torch.Tensor:
        """Evaluates a parsed filter exactly on some items only.

        Equal to ``self.take(rows).evaluate(node, expr)``, but gathers only the rows of the
        features the filter names (once each) and compacts no vocabulary.

        Args:
            node (FilterNode): the filter tree.
            rows (torch.Tensor): int64 [M], item indices in ``[0, N)`` (repeats allowed).
            expr (str | None): the filter text, shown in error messages.

        Returns:
            torch.Tensor: bool [M], whether item ``rows[j]`` passes the filter.

        Raises:
            FilterError: as :meth:`evaluate`.
            IndexError: for a row outside ``[0, N)``.
        """
        rows = torch.as_tensor(rows, dtype=torch.int64)
        if rows.dim() != 1:
            raise ValueError(f"rows must be 1-D, got shape {list(rows.shape)}")
        if len(rows) and (host(rows).min() < 0 or host(rows).max() >= self.num_items):
            raise IndexError(f"rows out of range for {self.num_items} items")
        gathered: dict[str, Column] = {}

        def column_of(name: str, column: Column) -> Column:
            if name not in gathered:
                gathered[name] = column.gather(rows)
            return gathered[name]

        return self._evaluate(node, expr, column_of)

    def _evaluate(
        self,
        node: FilterNode,
        expr: str | None,
        column_of: Callable[[str, Column], Column],
    ) -> torch.Tensor:
        if isinstance(node, Not):
            return ~self._evaluate(node.child, expr, column_of)
        if isinstance(node, (And, Or)):
            masks = [self._evaluate(child, expr, column_of) for child in node.children]
            combine = torch.logical_and if isinstance(node, And) else torch.logical_or
            out = masks[0]
            for mask in masks[1:]:
                out = combine(out, mask)
            return out
        column = self.columns.get(node.feature)
        if column is None:
            raise FilterError(
                f"unknown feature '{node.feature}' (known features: {', '.join(self.columns) or '(none)'})",
                expr,
                node.pos,
            )
        if isinstance(node, Compare):
            if not isinstance(column, NumericColumn):
                raise FilterError(f"feature '{node.feature}' is not numeric", expr, node.pos)
            column = column_of(node.feature, column)
            assert isinstance(column, NumericColumn)
            return column.compare(node.op, node.number)
        column = column_of(node.feature, column)
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
        """The column tensors; with :meth:`meta` they make the whole store. Keys:
        ``"<feature>.ids"`` (categorical, single layout), ``"<feature>.offsets"`` and
        ``"<feature>.value_ids"`` (categorical, multi layout), ``"<feature>.values"`` (numeric)."""
        tensors: dict[str, torch.Tensor] = {}
        for name, column in self.columns.items():
            tensors.update(column.tensors(name))
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
        """Rebuilds a store from :meth:`meta` and :meth:`to_tensors`, checking their consistency.
        A categorical feature's layout follows its tensors: ``.ids`` if present, else
        ``.offsets`` and ``.value_ids``."""
        try:
            n = int(meta["num_items"])
            specs = list(meta["features"])
            columns: dict[str, Column] = {}
            for spec in specs:
                name, kind = spec["name"], spec["kind"]
                if kind == "numeric":
                    columns[name] = NumericColumn.from_tensors(name, spec, tensors, n)
                elif kind == "categorical":
                    columns[name] = CategoricalColumn.from_tensors(name, spec, tensors, n)
                else:
                    raise ValueError(f"feature '{name}' has unknown kind {kind!r}")
        except (KeyError, TypeError) as e:
            raise ValueError(f"attribute store meta is malformed: {e!r}") from None
        return AttributeStore(n, columns)

    def nbytes(self) -> int:
        """Bytes held: every column tensor plus the vocabulary objects (each value, the tuple
        and the lookup dict, by ``sys.getsizeof``)."""
        return sum(c.nbytes() for c in self.columns.values())


def _check_numeric(item: int, name: str, value: Any) -> None:
    if value is None or isinstance(value, float):
        return
    if not isinstance(value, int):
        raise ValueError(f"item {item}, feature '{name}': the feature is numeric, got {type(value).__name__} {value!r}")
    if abs(value) > _MAX_EXACT_INT:
        raise ValueError(
            f"item {item}, feature '{name}': int {value} is too large to compare exactly as a "
            "number (|value| > 2**53); give the feature as strings"
        )
