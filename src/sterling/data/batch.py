"""Request-level training batches: jagged tensors with offsets, one user side per request.

A :class:`RequestBatch` holds ``R`` requests. Request-only (RO) data appears once per request; the
user's history and the request's impressions are jagged, stored as flat values plus offsets (the
layout of TorchRec's ``JaggedTensor`` and of generative-recommenders' DLRM-v3 batches)::

    request          r0            r1       r2
    history      [h h h h]       [h h]    [h h h]      history_offsets    = [0, 4, 6, 9]
    impressions  [i i]           [i i i]  [i]          impression_offsets = [0, 2, 5, 6]

Item ids are mapped to *item rows*: positions in the dataset's ``items.parquet`` (``ItemCatalog``), so
models index embedding tables directly. Categorical context and user features are encoded to
non-negative int64 codes (integers as they are, strings by a stable hash); models reduce them modulo
their own table sizes.

The users table is the side store of ROO (spec ``roo.md`` §2.1): each timeline is held once, in
memory, and a request's history is gathered on the fly as the events strictly before its ``ts``.
Request rows are streamed from Parquet batch by batch.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from sterling.data.schema import DatasetPaths, Roles, read_roles

__all__ = [
    "ItemCatalog",
    "RequestBatch",
    "RequestReader",
    "UserTimelines",
    "encode_categorical",
]


_TS_BITS = 34


def encode_categorical(values: pa.Array) -> np.ndarray:
    """Encode a scalar Arrow column to non-negative int64 codes.

    Integers (and booleans) keep their value (negative ones are folded with ``abs``); strings map
    through CRC32, which is stable across processes and machines; nulls map to 0.

    Args:
        values (pa.Array): ``[n]`` integer, boolean or string values.

    Returns:
        np.ndarray: int64 ``[n]``.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    t = values.type
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        out = values.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
        return np.abs(out)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        encoded = values.dictionary_encode() if not pa.types.is_dictionary(t) else values
        codes = np.array(
            [zlib.crc32(str(v).encode()) for v in encoded.dictionary.to_pylist()] + [0],
            dtype=np.int64,
        )
        idx = encoded.indices.fill_null(len(codes) - 1).to_numpy(zero_copy_only=False)
        return codes[idx]
    raise ValueError(f"cannot encode a column of type {t} as a categorical feature")


class ItemCatalog:
    """Maps external item ids to dense item rows (the order of ``items.parquet``).

    Args:
        item_ids (np.ndarray): int64 ``[N]`` unique external ids, in row order.
    """

    def __init__(self, item_ids: np.ndarray) -> None:
        item_ids = np.asarray(item_ids, dtype=np.int64)
        order = np.argsort(item_ids, kind="stable")
        sorted_ids = item_ids[order]
        if len(sorted_ids) > 1 and (sorted_ids[1:] == sorted_ids[:-1]).any():
            raise ValueError("item ids in the catalog are not unique")
        self.item_ids = item_ids
        self._sorted_ids = sorted_ids
        self._order = order

    def __len__(self) -> int:
        return len(self.item_ids)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Item rows ``int64 [n]`` of external ``ids [n]``; an id not in the catalog is an error."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self._sorted_ids, ids)
        pos = np.minimum(pos, len(self._sorted_ids) - 1)
        found = self._sorted_ids[pos] == ids
        if not found.all():
            missing = ids[~found][:5].tolist()
            raise ValueError(f"item ids not in the item catalog: {missing}")
        return self._order[pos]


class UserTimelines:
    """Every user's timeline, held once: flat arrays with per-user offsets.

    Attributes:
        user_ids: int64 ``[U]`` sorted.
        offsets: int64 ``[U + 1]``.
        item_rows, actions, ts: int64 ``[E]`` (events sorted by ts within a user).
        features: dict of int64 ``[U]`` encoded user feature columns.
    """

    def __init__(self, users: pa.Table, catalog: ItemCatalog, roles: Roles) -> None:
        users = users.sort_by("user_id")
        self.user_ids = users.column("user_id").to_numpy()
        items = users.column("timeline_item_id").combine_chunks()
        self.offsets = items.offsets.to_numpy().astype(np.int64) - items.offsets[0].as_py()
        self.item_rows = catalog.rows(items.flatten().to_numpy())
        self.actions = _flat_int(users.column("timeline_action"))
        self.ts = _flat_int(users.column("timeline_ts"))
        self.features = {f: encode_categorical(users.column(f)) for f in roles.user}
        if len(self.ts) and (self.ts.min() < 0 or self.ts.max() >= 1 << _TS_BITS):
            raise ValueError(f"timeline ts must be unix seconds in [0, 2**{_TS_BITS})")
        owner = np.repeat(np.arange(len(self.user_ids), dtype=np.int64), np.diff(self.offsets))
        # (user, ts) packed in one sorted int64 key: one searchsorted finds every history's end.
        self._event_keys = (owner << _TS_BITS) | self.ts

    @classmethod
    def read(cls, path: Path, catalog: ItemCatalog) -> UserTimelines:
        table = pq.read_table(path)
        return cls(table, catalog, read_roles(table.schema))

    def user_index(self, user_ids: np.ndarray) -> np.ndarray:
        """Positions ``[n]`` of ``user_ids`` in this table; an unknown user is an error."""
        pos = np.searchsorted(self.user_ids, user_ids)
        pos = np.minimum(pos, len(self.user_ids) - 1)
        ok = self.user_ids[pos] == user_ids
        if not ok.all():
            raise ValueError(f"users not in the users table: {user_ids[~ok][:5].tolist()}")
        return pos

    def history_bounds(self, user_ids: np.ndarray, ts: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Start and end ``int64 [n]`` of each request's history: events strictly before ``ts``, at most
        the ``max_len`` most recent."""
        u = self.user_index(np.asarray(user_ids, dtype=np.int64))
        ts = np.asarray(ts, dtype=np.int64)
        if len(ts) and (ts.min() < 0 or ts.max() >= 1 << _TS_BITS):
            raise ValueError(f"request ts must be unix seconds in [0, 2**{_TS_BITS})")
        end = np.searchsorted(self._event_keys, (u << _TS_BITS) | ts, side="left")
        start = np.maximum(self.offsets[u], end - max_len)
        return start, end


def _flat_int(col: pa.ChunkedArray) -> np.ndarray:
    return col.combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.int64)


def _jagged_gather(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of the ranges ``[start[i], end[i])`` and offsets ``[n + 1]``."""
    lengths = end - start
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    idx = np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1])
    return idx, offsets


@dataclass(frozen=True)
class RequestBatch:
    """``R`` requests with jagged histories and impressions (``L = Σ history lengths``,
    ``K = Σ impressions``, ``T`` labels).

    Attributes:
        request_ids, user_ids, ts: int64 ``[R]``.
        context: encoded context features, each int64 ``[R]``.
        user_features: encoded user features, each int64 ``[R]``.
        history_items, history_actions, history_ts: int64 ``[L]``, oldest first within a request.
        history_offsets: int64 ``[R + 1]``.
        item_rows, positions: int64 ``[K]`` impressions in served order.
        labels: float32 ``[K, T]``.
        impression_features: numeric impression features, each float32 ``[K]``.
        impression_offsets: int64 ``[R + 1]``.
    """

    request_ids: torch.Tensor
    user_ids: torch.Tensor
    ts: torch.Tensor
    context: dict[str, torch.Tensor]
    user_features: dict[str, torch.Tensor]
    history_items: torch.Tensor
    history_actions: torch.Tensor
    history_ts: torch.Tensor
    history_offsets: torch.Tensor
    item_rows: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    impression_features: dict[str, torch.Tensor]
    impression_offsets: torch.Tensor

    @property
    def num_requests(self) -> int:
        return int(self.request_ids.numel())

    @property
    def num_impressions(self) -> int:
        return int(self.item_rows.numel())

    def impression_to_request(self) -> torch.Tensor:
        """int64 ``[K]``: the request of each impression (``cand_to_request_index`` of the spec)."""
        lengths = self.impression_offsets[1:] - self.impression_offsets[:-1]
        return torch.repeat_interleave(torch.arange(self.num_requests), lengths)

    def requests(self, lo: int, hi: int) -> RequestBatch:
        """The batch of requests ``lo:hi`` (views, offsets rebased to 0)."""
        h0, h1 = int(self.history_offsets[lo]), int(self.history_offsets[hi])
        k0, k1 = int(self.impression_offsets[lo]), int(self.impression_offsets[hi])
        return RequestBatch(
            request_ids=self.request_ids[lo:hi],
            user_ids=self.user_ids[lo:hi],
            ts=self.ts[lo:hi],
            context={n: v[lo:hi] for n, v in self.context.items()},
            user_features={n: v[lo:hi] for n, v in self.user_features.items()},
            history_items=self.history_items[h0:h1],
            history_actions=self.history_actions[h0:h1],
            history_ts=self.history_ts[h0:h1],
            history_offsets=self.history_offsets[lo : hi + 1] - h0,
            item_rows=self.item_rows[k0:k1],
            positions=self.positions[k0:k1],
            labels=self.labels[k0:k1],
            impression_features={n: v[k0:k1] for n, v in self.impression_features.items()},
            impression_offsets=self.impression_offsets[lo : hi + 1] - k0,
        )


class RequestReader:
    """Streams :class:`RequestBatch` es from a request-format dataset directory.

    Requests are read from ``requests.parquet`` record batch by record batch and packed into
    batches of at most ``token_budget`` tokens (history events + impressions), so a batch's cost
    is bounded however requests vary in size.

    Args:
        data_dir (Path): dataset directory (``requests.parquet``, ``users.parquet``, ``items.parquet``).
        catalog (ItemCatalog): item id → row mapping.
        max_history (int): most recent history events kept per request.
        token_budget (int): upper bound of Σ (history length + impressions) per batch; a single
            request larger than the budget forms a batch of its own.
        timelines (UserTimelines | None): reuse an already loaded users table.

    Example::

        reader = RequestReader(Path("runs/demo/data"), catalog, max_history=100)
        for batch in reader.batches(exclude=holdout):
            loss = two_tower_loss(model, batch, item_terms, 512, frequency)
    """

    def __init__(
        self,
        data_dir: Path,
        catalog: ItemCatalog,
        max_history: int = 100,
        token_budget: int = 16384,
        timelines: UserTimelines | None = None,
    ) -> None:
        if max_history < 1 or token_budget < 1:
            raise ValueError("max_history and token_budget must be positive")
        self.paths = DatasetPaths(Path(data_dir))
        self.catalog = catalog
        self.max_history = max_history
        self.token_budget = token_budget
        self.timelines = timelines or UserTimelines.read(self.paths.users, catalog)
        self.roles = read_roles(pq.read_schema(self.paths.requests))

    def batches(
        self, exclude: np.ndarray | None = None, only: np.ndarray | None = None, read_rows: int = 4096
    ) -> Iterator[RequestBatch]:
        """Yield batches in file order, skipping request ids in ``exclude`` / keeping only ``only``."""
        pending: list[pa.Table] = []
        tokens = 0
        source = pq.ParquetFile(self.paths.requests)
        for rb in source.iter_batches(batch_size=read_rows):
            table = pa.Table.from_batches([rb])
            if exclude is not None and len(exclude):
                table = table.filter(pc.invert(pc.is_in(table["request_id"], pa.array(exclude, pa.int64()))))
            if only is not None:
                table = table.filter(pc.is_in(table["request_id"], pa.array(only, pa.int64())))
            start = 0
            for i, size in enumerate(self._request_tokens(table)):
                if tokens and tokens + size > self.token_budget:
                    pending.append(table.slice(start, i - start))
                    yield self._make_batch(pending)
                    pending, tokens, start = [], 0, i
                tokens += int(size)
            pending.append(table.slice(start))
        if tokens:
            yield self._make_batch(pending)

    def _request_tokens(self, table: pa.Table) -> np.ndarray:
        start, end = self.timelines.history_bounds(
            table.column("user_id").to_numpy(), table.column("ts").to_numpy(), self.max_history
        )
        k = pc.list_value_length(table.column("impressions")).to_numpy(zero_copy_only=False)
        return (end - start) + k

    def _make_batch(self, parts: list[pa.Table]) -> RequestBatch:
        table = pa.concat_tables([p for p in parts if p.num_rows])
        tl = self.timelines
        user_ids = table.column("user_id").to_numpy()
        ts = table.column("ts").to_numpy()
        start, end = tl.history_bounds(user_ids, ts, self.max_history)
        hidx, hoffsets = _jagged_gather(start, end)
        imps = table.column("impressions").combine_chunks()
        flat = imps.flatten()
        ioffsets = imps.offsets.to_numpy().astype(np.int64)
        ioffsets = ioffsets - ioffsets[0]
        labels = np.stack(
            [flat.field(name).to_numpy(zero_copy_only=False) for name in self.roles.labels], axis=1
        ).astype(np.float32)
        uidx = tl.user_index(user_ids)
        t = torch.from_numpy
        return RequestBatch(
            request_ids=t(table.column("request_id").to_numpy().copy()),
            user_ids=t(user_ids.copy()),
            ts=t(ts.copy()),
            context={f: t(encode_categorical(table.column(f))) for f in self.roles.context},
            user_features={f: t(v[uidx]) for f, v in tl.features.items()},
            history_items=t(tl.item_rows[hidx]),
            history_actions=t(tl.actions[hidx]),
            history_ts=t(tl.ts[hidx]),
            history_offsets=t(hoffsets),
            item_rows=t(self.catalog.rows(flat.field("item_id").to_numpy())),
            positions=t(flat.field("position").to_numpy(zero_copy_only=False).astype(np.int64)),
            labels=t(labels),
            impression_features={
                f: t(flat.field(f).to_numpy(zero_copy_only=False).astype(np.float32))
                for f in self.roles.impression_features
                if _is_numeric(flat.field(f).type)
            },
            impression_offsets=t(ioffsets),
        )


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
