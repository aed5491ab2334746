"""The Bloom index: a packed, transposed bit signature per item, built from the attribute store.

Built from an :class:`~sterling.index.attributes.AttributeStore` and a row order (the IVF's
cluster-sorted order; identity by default), it answers "which rows may pass this filter?" with
64 items per int64 word. ``bits`` is int64 [n_bits, ceil(N / 64)]: bit row ``p``, word ``w``,
bit ``j`` is position ``p`` of index row ``64w + j``, and index row ``r`` is store item
``order[r]``, so a cluster is a contiguous run of words in every bit row. Bit rows are, in
order: one dedicated (exact) bit per frequent categorical value, range buckets per numeric
feature, then a hashed region of width M where every other categorical value sets
``num_hashes`` positions (splitmix64 double hashing, deterministic across processes).

:meth:`BloomIndex.compile` turns a filter into a :class:`~sterling.index.bloom_plan.BloomPlan`
(:mod:`sterling.index.bloom_plan`) whose mask is a superset of the exact answer;
:mod:`sterling.ops.plan_program` evaluates plans, here for :meth:`BloomIndex.candidates` and in
the scan kernels over the probed clusters. The layout, the width rule, the exactness argument
and measured costs are in ``docs/bloom.md``.

Example::

    store = AttributeStore.build([{"genre": ["Drama"], "year": 1995}, {"year": 1980}, {}])
    index = BloomIndex.build(store)
    plan = index.compile("NOT year >= 1990")
    index.candidates(plan)  # tensor([1, 2]); plan.exact is True
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sterling.index.attributes import AttributeStore
from sterling.index.bloom_plan import ABSENT, HASHED, BloomPlan, CategoricalBits, NumericBuckets, PlanCompiler
from sterling.index.columns import CategoricalColumn, NumericColumn
from sterling.index.filter import FilterNode, Value, parse
from sterling.ops.cpu.bits import set_bits
from sterling.ops.plan_program import encode, plan_words

FORMAT_VERSION = 1
_PAIRS_PER_CHUNK = 1 << 22  # (bit, row) pairs set per pass during build; bounds build memory
_PLAN_CACHE = 4096  # compiled plans kept per index


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
    dedicated_bits: int = 128
    dedicated_min_freq: float = 0.005
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


class BloomIndex:
    """A Bloom filter index over the attributes of N items, stored transposed (the layout and the
    exactness argument are in ``docs/bloom.md``).

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
        features: Sequence[CategoricalBits | NumericBuckets],
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
        hashed_rows = functools.partial(_hashed_rows, hashed_base, hashed_width, config.num_hashes, config.seed)
        self._compiler = PlanCompiler(self._features, hashed_rows)

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

        features: list[CategoricalBits | NumericBuckets] = []
        bit_row = sum(int((t >= 0).sum()) for t in term_bits.values())  # dedicated rows first
        buckets: dict[str, torch.Tensor] = {}  # name -> int64 [N] bucket of each item, -1 missing
        for i, (name, column) in enumerate(columns):
            if isinstance(column, NumericColumn):
                lo, hi, bucket = _numeric_buckets(column, config.numeric_buckets)
                features.append(NumericBuckets(name, i, bit_row, lo, hi))
                buckets[name] = bucket
                bit_row += len(lo)
            else:
                tb = term_bits[name]
                features.append(CategoricalBits(name, i, column.vocab, tb, _lookup(column.vocab)))
        hashed_base = bit_row

        hashed_per_item = torch.zeros(n, dtype=torch.int64)
        for _, name, column in categorical:
            entry_rows, entry_ids = column.entries()  # computed on the fly, not stored
            hashed = term_bits[name][entry_ids] == HASHED
            hashed_per_item += torch.bincount(entry_rows[hashed], minlength=n)
        width = 0
        if int(hashed_per_item.sum()) > 0:
            sorted_counts = torch.sort(hashed_per_item).values
            q = int(sorted_counts[min(n - 1, math.ceil(config.width_quantile * (n - 1)))])
            width = max(math.ceil(config.bits_per_term * max(q, 1)), config.num_hashes, config.min_hashed_width)

        bits = torch.zeros(hashed_base + width, (n + 63) // 64, dtype=torch.int64)
        for feature in features:
            if isinstance(feature, NumericBuckets):
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
            hashed = torch.nonzero(tb == HASHED).squeeze(1)
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
        numeric = sum(len(f.lo) for f in self._features.values() if isinstance(f, NumericBuckets))
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
            if isinstance(f, NumericBuckets):
                total += f.lo.numel() * 8 + f.hi.numel() * 8
            else:
                total += f.term_bits.numel() * 4
        return total

    def bytes_per_item(self) -> float:
        """Bytes of the bit matrix per item: ``n_bits / 8`` plus the last word's padding."""
        return self._bits.numel() * 8 / max(self._num_rows, 1)

    # ---- compile and candidates --------------------------------------------------------------

    def compile(self, node: FilterNode | str, expr: str | None = None) -> BloomPlan:
        """Compiles a filter into a plan whose mask is a superset of the exact answer (cached per
        filter tree; see :class:`~sterling.index.bloom_plan.PlanCompiler`).

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
            plan = self._compiler.compile(node, expr)
            if len(self._plans) >= _PLAN_CACHE:
                self._plans.clear()
            self._plans[node] = plan
        return plan

    def candidates(self, plan: BloomPlan) -> torch.Tensor:
        """int64 [C]: the rows (index order, ascending) that may pass ``plan``, evaluated over all
        words by :func:`sterling.ops.plan_program.plan_words`."""
        words = plan_words(self._bits, encode([plan]), 0)
        tail = self._num_rows % 64
        if tail:  # rows past N in the last word
            words[-1] &= (1 << tail) - 1
        return torch.from_numpy(set_bits(words))

    # ---- snapshot ----------------------------------------------------------------------------

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """``bits``, ``term_bits`` (int32, categorical features concatenated), ``bucket_lo`` and
        ``bucket_hi`` (float64, numeric features concatenated); with :meth:`meta`, the index."""
        cats = [f.term_bits for f in self._features.values() if isinstance(f, CategoricalBits)]
        nums = [f for f in self._features.values() if isinstance(f, NumericBuckets)]
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
            if isinstance(f, NumericBuckets):
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
            features: list[CategoricalBits | NumericBuckets] = []
            t = b = 0
            for spec in meta["features"]:
                name, index = str(spec["name"]), int(spec["index"])
                if spec["kind"] == "numeric":
                    k, offset = int(spec["buckets"]), int(spec["bit_offset"])
                    if b + k > len(lo) or not 0 <= offset <= offset + k <= base:
                        raise ValueError(f"feature '{name}': buckets out of range")
                    features.append(NumericBuckets(name, index, offset, lo[b : b + k], hi[b : b + k]))
                    b += k
                elif spec["kind"] == "categorical":
                    vocab = tuple(spec["vocab"])
                    tb = term_bits[t : t + len(vocab)]
                    bad = len(tb) > 0 and (int(tb.min()) < ABSENT or int(tb.max()) >= base)
                    if len(tb) != len(vocab) or bad:
                        raise ValueError(f"feature '{name}': term bits do not match its vocabulary")
                    features.append(CategoricalBits(name, index, vocab, tb, _lookup(vocab)))
                    t += len(vocab)
                else:
                    raise ValueError(f"feature '{name}' has unknown kind {spec['kind']!r}")
            if t != len(term_bits) or b != len(lo):
                raise ValueError("term_bits / bucket tensors have entries no feature owns")
        except (KeyError, TypeError) as e:
            raise ValueError(f"Bloom index meta is malformed: {e!r}") from None
        return BloomIndex(bits, n, features, base, width, config)


# ---- helpers ---------------------------------------------------------------------------------


def _hashed_rows(base: int, width: int, num_hashes: int, seed: int, feature: int, value_ids: np.ndarray) -> np.ndarray:
    """int64 [T, num_hashes]: the bit rows of the hashed terms ``(feature, value_ids[t])``."""
    return base + _positions(feature, value_ids, width, num_hashes, seed)


def _lookup(vocab: Sequence[Value]) -> dict[Value, int]:
    return {v: i for i, v in enumerate(vocab)}


def _assign_dedicated(
    categorical: Sequence[tuple[int, str, CategoricalColumn]], n: int, config: BloomConfig
) -> dict[str, torch.Tensor]:
    """int32 [V_f] per categorical feature: a dedicated bit row, HASHED or ABSENT. The most
    frequent values (ties by feature, then vocabulary id) at or above the threshold get bits."""
    # items holding each value; a value listed twice on one item counts once
    counts = [column.item_counts() for _, _, column in categorical]
    term_bits = [torch.where(c > 0, HASHED, ABSENT).to(torch.int32) for c in counts]
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
