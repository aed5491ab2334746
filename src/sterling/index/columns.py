"""Attribute columns: the exact storage of one feature of an
:class:`~sterling.index.attributes.AttributeStore`, categorical or numeric.

Storage, for N items (compact: about one byte per item for a single-valued feature with a small
vocabulary, nothing derived is kept):

- categorical feature (:class:`CategoricalColumn`): a vocabulary (the distinct values present,
  ``str`` and ``int`` kept apart) and one of two layouts, chosen from the data:

  - *single* (no item holds more than one value): ``ids`` [N], the vocabulary id of each item's
    value, ``-1`` where missing;
  - *multi* (some item holds several values, a repeated value included): a CSR forward index,
    ``offsets`` [N + 1] and ``value_ids`` [nnz]; item ``i`` has the values
    ``vocab[value_ids[offsets[i]:offsets[i + 1]]]``. ``offsets`` is int32 while nnz < 2**31,
    else int64.

  Ids take the smallest signed dtype holding ``-1 .. V - 1`` for a vocabulary of V values: int8
  for V <= 128, int16 for V <= 32768, else int32. The layout is independent of whether values
  were given as lists (``multi`` in :meth:`~sterling.index.attributes.AttributeStore.meta`,
  which only decides whether ``decode`` returns lists): ``[["a"], ["b"]]`` is stored single.
  Appending an item with two values turns a single column into a multi one; ``take`` turns it
  back when it can. The item of each CSR entry is never stored: it is computed on the fly where
  needed (:meth:`CategoricalColumn.entries`, a ``searchsorted`` over the hits in ``matches``).
- numeric feature (:class:`NumericColumn`): ``values`` [N], one of

  - int8 / int16 / int32, when every present value is an integer (``-0.0`` excluded) that fits
    above the dtype's minimum, which marks a missing value (the smallest such dtype is chosen
    when the column is built or grown; ``take`` keeps the dtype);
  - float64, ``NaN`` where missing (present values are always finite).

  Both decode to the exact float64 of the input; comparisons on integer storage are done in
  integers (``v >= 2.5`` as ``v >= 3``), so they equal the float64 comparisons exactly.

A column's ``tensors(name)`` and ``from_tensors(name, spec, tensors, n)`` are its snapshot form.
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import chain
from typing import Any

import numpy as np
import torch

from sterling.index.filter import Value, as_number

_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "=": operator.eq,
    "!=": operator.ne,
}
_ID_DTYPES = (torch.int8, torch.int16, torch.int32)
_NUMERIC_DTYPES = (torch.int8, torch.int16, torch.int32, torch.float64)
_NUMPY = {torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64}


def id_dtype(vocab_size: int) -> torch.dtype:
    """The smallest signed dtype holding the ids ``-1 .. vocab_size - 1``."""
    for dtype in _ID_DTYPES:
        if vocab_size - 1 <= torch.iinfo(dtype).max:
            return dtype
    raise ValueError(f"a vocabulary of {vocab_size} values is too large")


def offsets_dtype(nnz: int) -> torch.dtype:
    """int32 for CSR offsets into fewer than 2**31 values, else int64."""
    return torch.int32 if nnz <= torch.iinfo(torch.int32).max else torch.int64


def _compact_ids(ids: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(used, remap): the vocabulary ids present in ``ids`` (ascending, int64) and int64
    [vocab_size + 1] mapping ``id + 1`` to its new id (``-1`` to ``-1``)."""
    counts = torch.bincount(ids.long() + 1, minlength=vocab_size + 1)[1:]
    used = torch.nonzero(counts).squeeze(1)
    remap = torch.full((vocab_size + 1,), -1, dtype=torch.int64)
    remap[used + 1] = torch.arange(len(used))
    return used, remap


def _csr_gather(
    offsets: torch.Tensor, value_ids: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lengths int64 [M], value ids [sum lengths]) of the CSR items at ``rows``."""
    starts = offsets[:-1][rows].long()
    lengths = offsets[1:][rows].long() - starts
    total = int(lengths.sum())
    first = torch.cumsum(lengths, 0) - lengths  # where each item starts in the output
    shift = torch.repeat_interleave(starts - first, lengths, output_size=total)
    return lengths, value_ids[shift + torch.arange(total)]


@dataclass(frozen=True)
class CategoricalColumn:
    """One categorical feature (see the module docstring for the two layouts).

    Args:
        vocab (tuple[str | int, ...]): the distinct values (those present in some item once the
            column was built; ``take`` drops the others).
        value_ids (torch.Tensor): single layout: [N], each item's vocabulary id or -1 where
            missing; multi layout: [nnz], the vocabulary ids of the CSR entries. Dtype
            :func:`id_dtype` ``(len(vocab))``.
        offsets (torch.Tensor | None): None for the single layout; multi layout: int32 / int64
            [N + 1], CSR row offsets into ``value_ids``.
        multi (bool): whether values were given as lists (``decode`` returns lists).
    """

    vocab: tuple[Value, ...]
    value_ids: torch.Tensor
    offsets: torch.Tensor | None
    multi: bool

    @cached_property
    def lookup(self) -> dict[Value, int]:
        """value -> vocabulary id."""
        return {v: i for i, v in enumerate(self.vocab)}

    @staticmethod
    def empty() -> CategoricalColumn:
        return CategoricalColumn((), torch.zeros(0, dtype=torch.int8), None, False)

    @staticmethod
    def _of(
        vocab: tuple[Value, ...],
        value_ids: torch.Tensor,
        offsets: torch.Tensor | None,
        multi: bool,
        lookup: dict[Value, int] | None = None,
    ) -> CategoricalColumn:
        """A column in canonical form: single layout when no item has two values, smallest
        dtypes; ``lookup`` (value -> id of ``vocab``) is reused when given."""
        if offsets is not None:
            lengths = offsets[1:] - offsets[:-1]
            if len(lengths) == 0 or int(lengths.max()) <= 1:
                single = torch.full((len(lengths),), -1, dtype=id_dtype(len(vocab)))
                single[lengths.bool()] = value_ids.to(single.dtype)
                value_ids, offsets = single, None
            else:
                offsets = offsets.to(offsets_dtype(len(value_ids)))
        column = CategoricalColumn(vocab, value_ids.to(id_dtype(len(vocab))), offsets, multi)
        if lookup is not None:
            column.__dict__["lookup"] = lookup  # the cached_property's slot
        return column

    @property
    def single(self) -> bool:
        """Whether the column uses the single layout (one id per item)."""
        return self.offsets is None

    @property
    def num_items(self) -> int:
        return len(self.value_ids) if self.offsets is None else len(self.offsets) - 1

    def lengths(self) -> torch.Tensor:
        """int64 [N]: the number of values of each item."""
        if self.offsets is None:
            return (self.value_ids >= 0).long()
        return (self.offsets[1:] - self.offsets[:-1]).long()

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows int64 [E], ids int64 [E]): every (item, vocabulary id) entry, by item, in each
        item's value order (computed on the fly, nothing is cached)."""
        if self.offsets is None:
            rows = torch.nonzero(self.value_ids >= 0).squeeze(1)
            return rows, self.value_ids[rows].long()
        rows = torch.repeat_interleave(torch.arange(self.num_items), self.lengths(), output_size=len(self.value_ids))
        return rows, self.value_ids.long()

    def item_counts(self) -> torch.Tensor:
        """int64 [V]: the number of items holding each value (a repeated value counts once)."""
        v = len(self.vocab)
        if self.offsets is None:
            return torch.bincount(self.value_ids.long() + 1, minlength=v + 1)[1:]
        rows, ids = self.entries()
        pairs = torch.unique(rows * max(v, 1) + ids)
        return torch.bincount(pairs % max(v, 1), minlength=v)

    def extend(self, values: Sequence[Any], multi: bool = False) -> CategoricalColumn:
        """Appends items; ``values[i]`` is new item ``i``'s value: None (missing), a str / int or
        a non-empty list of them. ``multi`` marks the column as given in lists."""
        lookup = dict(self.lookup)
        multi = self.multi or multi
        if list not in set(map(type, values)):  # one value at most per item: dict passes in C
            for v in dict.fromkeys(values):  # the distinct values, in first-seen order
                if v is not None and v not in lookup:
                    lookup[v] = len(lookup)
            vocab = tuple(lookup)
            lookup[None] = -1  # type: ignore[index]
            new = np.fromiter(map(lookup.__getitem__, values), dtype=np.int64, count=len(values))
            del lookup[None]  # type: ignore[arg-type]
            if self.offsets is None:
                dtype = _NUMPY[id_dtype(len(vocab))]
                ids = np.concatenate([self.value_ids.numpy().astype(dtype), new.astype(dtype)])
                return CategoricalColumn._of(vocab, torch.from_numpy(ids), None, multi, lookup)
            lengths = torch.from_numpy((new >= 0).astype(np.int64))
            new_ids = torch.from_numpy(new[new >= 0])
        else:
            seqs = [v if type(v) is list else () if v is None else (v,) for v in values]
            for v in dict.fromkeys(chain.from_iterable(seqs)):
                if v not in lookup:
                    lookup[v] = len(lookup)
            vocab = tuple(lookup)
            counts = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
            flat = map(lookup.__getitem__, chain.from_iterable(seqs))
            lengths = torch.from_numpy(counts)
            new_ids = torch.from_numpy(np.fromiter(flat, dtype=np.int64, count=int(counts.sum())))
        _, old_ids = self.entries()
        all_lengths = torch.cat([self.lengths(), lengths])
        offsets = torch.zeros(len(all_lengths) + 1, dtype=torch.int64)
        torch.cumsum(all_lengths, 0, out=offsets[1:])
        return CategoricalColumn._of(vocab, torch.cat([old_ids, new_ids]), offsets, multi, lookup)

    def gather(self, rows: torch.Tensor) -> CategoricalColumn:
        """The items at ``rows`` (int64 [M]) with the same vocabulary (no compaction)."""
        if self.offsets is None:
            column = CategoricalColumn(self.vocab, self.value_ids[rows], None, self.multi)
        else:
            lengths, ids = _csr_gather(self.offsets, self.value_ids, rows)
            offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
            torch.cumsum(lengths, 0, out=offsets[1:])
            column = CategoricalColumn(self.vocab, ids, offsets.to(offsets_dtype(len(ids))), self.multi)
        column.__dict__["lookup"] = self.lookup
        return column

    def take(self, rows: torch.Tensor) -> CategoricalColumn:
        """The items at ``rows`` (int64 [M]); the vocabulary keeps only values still present."""
        taken = self.gather(rows)
        used, remap = _compact_ids(taken.value_ids, len(self.vocab))
        if len(used) == len(self.vocab):
            return CategoricalColumn._of(self.vocab, taken.value_ids, taken.offsets, self.multi, self.lookup)
        vocab = tuple(self.vocab[i] for i in used.tolist())
        ids = remap[taken.value_ids.long() + 1]
        return CategoricalColumn._of(vocab, ids, taken.offsets, self.multi)

    def _ids_of(self, values: Iterable[Value]) -> list[int]:
        ids = set()
        for v in values:
            for form in (v, str(v)) if isinstance(v, int) else (v,):
                if form in self.lookup:
                    ids.add(self.lookup[form])
        return sorted(ids)

    def matches(self, values: Iterable[Value]) -> torch.Tensor:
        """bool [N]: items having at least one of ``values``."""
        ids = self._ids_of(values)
        if not ids:
            return torch.zeros(self.num_items, dtype=torch.bool)
        if len(ids) == 1:
            hit = self.value_ids == ids[0]
        else:
            hit = torch.isin(self.value_ids, torch.tensor(ids, dtype=self.value_ids.dtype))
        if self.offsets is None:
            return hit
        mask = torch.zeros(self.num_items, dtype=torch.bool)
        entries = torch.nonzero(hit).squeeze(1)
        mask[torch.searchsorted(self.offsets, entries, right=True) - 1] = True
        return mask

    def decode(self, row: int) -> Any:
        if self.offsets is None:
            i = int(self.value_ids[row])
            ids = [] if i < 0 else [i]
        else:
            ids = self.value_ids[self.offsets[row] : self.offsets[row + 1]].tolist()
        if not ids:
            return None
        return [self.vocab[i] for i in ids] if self.multi else self.vocab[ids[0]]

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        if self.offsets is None:
            return {f"{name}.ids": self.value_ids}
        return {f"{name}.offsets": self.offsets, f"{name}.value_ids": self.value_ids}

    def nbytes(self) -> int:
        """Tensor bytes plus the vocabulary objects (values, tuple and lookup dict)."""
        tensors = self.value_ids.numel() * self.value_ids.element_size()
        if self.offsets is not None:
            tensors += self.offsets.numel() * self.offsets.element_size()
        vocab = sys.getsizeof(self.vocab) + sum(sys.getsizeof(v) for v in self.vocab)
        return tensors + vocab + sys.getsizeof(self.lookup)

    @staticmethod
    def from_tensors(
        name: str, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], n: int
    ) -> CategoricalColumn:
        """The column of feature ``name`` from its :meth:`tensors` and its ``spec`` in the store's
        meta, checking their consistency."""
        vocab = tuple(spec["vocab"])
        if any(isinstance(v, bool) or not isinstance(v, (str, int)) for v in vocab) or len(set(vocab)) != len(vocab):
            raise ValueError(f"feature '{name}': vocabulary must hold distinct str/int values")
        dtype = id_dtype(len(vocab))
        if f"{name}.ids" in tensors:
            ids = _part(tensors, f"{name}.ids", dtype, n)
            if len(ids) and (int(ids.min()) < -1 or int(ids.max()) >= len(vocab)):
                raise ValueError(f"feature '{name}': value ids outside the vocabulary of {len(vocab)}")
            return CategoricalColumn(vocab, ids, None, bool(spec["multi"]))
        value_ids = _part(tensors, f"{name}.value_ids", dtype, -1)
        offsets = _part(tensors, f"{name}.offsets", offsets_dtype(len(value_ids)), n + 1)
        if offsets[0] != 0 or offsets[-1] != len(value_ids) or bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError(f"feature '{name}': offsets are not a valid CSR index into {len(value_ids)} values")
        if len(value_ids) and (int(value_ids.min()) < 0 or int(value_ids.max()) >= len(vocab)):
            raise ValueError(f"feature '{name}': value ids outside the vocabulary of {len(vocab)}")
        return CategoricalColumn(vocab, value_ids, offsets, bool(spec["multi"]))


def _encode_numeric(values: np.ndarray) -> torch.Tensor:
    """The storage of float64 ``values`` (NaN where missing): the smallest int dtype when every
    present value is an integer that fits above the dtype's minimum (``-0.0`` excluded), else
    float64 as is."""
    present = ~np.isnan(values)
    p = values[present]
    integer = bool(np.all(np.floor(p) == p)) and not bool(np.any((p == 0) & np.signbit(p)))
    if integer:
        lo, hi = (float(p.min()), float(p.max())) if len(p) else (0.0, 0.0)
        for dtype in _ID_DTYPES:
            info = torch.iinfo(dtype)
            if info.min < lo and hi <= info.max:
                out = np.full(len(values), info.min, dtype=_NUMPY[dtype])
                out[present] = p.astype(_NUMPY[dtype])
                return torch.from_numpy(out)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))


@dataclass(frozen=True)
class NumericColumn:
    """One numeric feature.

    Args:
        data (torch.Tensor): [N]; int8 / int16 / int32 with the dtype's minimum where missing,
            or float64 with NaN where missing.
        integral (bool): whether every value was an int (``decode`` returns ints).
    """

    data: torch.Tensor
    integral: bool

    @staticmethod
    def empty() -> NumericColumn:
        return NumericColumn(torch.zeros(0, dtype=torch.int8), True)

    @property
    def is_float(self) -> bool:
        return self.data.dtype == torch.float64

    @property
    def _missing(self) -> int:
        return torch.iinfo(self.data.dtype).min

    @property
    def present(self) -> torch.Tensor:
        """bool [N]: items having a value."""
        if self.is_float:
            return ~torch.isnan(self.data)
        return self.data != self._missing

    @property
    def values(self) -> torch.Tensor:
        """float64 [N], 0 where missing (a new tensor)."""
        return torch.where(self.present, self.data.double(), 0.0)

    def _floats(self) -> np.ndarray:
        """float64 [N], NaN where missing."""
        if self.is_float:
            return self.data.numpy()
        return np.where(self.present.numpy(), self.data.numpy().astype(np.float64), np.nan)

    def extend(self, values: Sequence[int | float | None]) -> NumericColumn:
        """Appends items; ``values[i]`` is the value of new item ``i`` or None."""
        new = np.array(values, dtype=np.float64)  # None -> NaN; ints are within 2**53
        types = set(map(type, values))
        return NumericColumn(
            _encode_numeric(np.concatenate([self._floats(), new.reshape(-1)])),
            self.integral and float not in types,
        )

    def gather(self, rows: torch.Tensor) -> NumericColumn:
        return NumericColumn(self.data[rows], self.integral)

    take = gather

    def matches(self, values: Iterable[Value]) -> torch.Tensor:
        """bool [N]: items whose value equals one of ``values`` read as numbers."""
        wanted = [x for x in map(as_number, values) if x is not None]
        if self.is_float:
            return torch.isin(self.data, torch.tensor(wanted, dtype=torch.float64))
        info = torch.iinfo(self.data.dtype)
        ints = sorted({int(x) for x in wanted if info.min < x <= info.max and x == math.floor(x)})
        return torch.isin(self.data, torch.tensor(ints, dtype=self.data.dtype))

    def compare(self, op: str, number: float) -> torch.Tensor:
        """bool [N]: items whose value ``op`` ``number`` (a missing value never passes)."""
        x = float(number)
        if self.is_float:
            out = _COMPARE[op](self.data, x)
            return out & self.present if op == "!=" else out
        info = torch.iinfo(self.data.dtype)
        present = self.present
        if not info.min < x <= info.max:  # NaN or beyond every stored value: one answer for all
            passes = _COMPARE[op](float(info.max) if x > 0 else 0.0, x)
            return present if passes else torch.zeros_like(present)
        # exact in integers: for an integer v, v >= x <=> v >= ceil(x), v <= x <=> v <= floor(x)
        if op in (">=", "<"):
            t = math.ceil(x)
        elif op in ("<=", ">"):
            t = math.floor(x)
        elif x != math.floor(x):  # = / != a non-integer
            return present & (op == "!=")
        else:
            t = int(x)
        return present & _COMPARE[op](self.data, t)

    def decode(self, row: int) -> Any:
        value = self.data[row].item()
        if self.is_float:
            if math.isnan(value):
                return None
            return int(value) if self.integral else value
        if value == self._missing:
            return None
        return value if self.integral else float(value)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.values": self.data}

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @staticmethod
    def from_tensors(name: str, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], n: int) -> NumericColumn:
        """The column of feature ``name`` from its :meth:`tensors` and its ``spec`` in the store's
        meta, checking their consistency."""
        data = _part(tensors, f"{name}.values", _NUMERIC_DTYPES, n)
        if data.dtype == torch.float64 and bool(torch.isinf(data).any()):
            raise ValueError(f"feature '{name}': numeric values must be finite (NaN marks missing)")
        return NumericColumn(data, bool(spec["integral"]))


Column = CategoricalColumn | NumericColumn


def _part(
    tensors: Mapping[str, torch.Tensor],
    key: str,
    dtypes: torch.dtype | tuple[torch.dtype, ...],
    length: int,
) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"attribute tensor '{key}' is missing")
    t = tensors[key]
    dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    if t.dtype not in dtypes or t.dim() != 1 or (length >= 0 and len(t) != length):
        want = f"[{length}]" if length >= 0 else "[*]"
        names = " or ".join(str(d) for d in dtypes)
        raise ValueError(f"attribute tensor '{key}' should be {names} {want}, got {t.dtype} {list(t.shape)}")
    return t
