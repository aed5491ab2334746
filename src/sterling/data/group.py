"""Lossless, streaming conversion between impression rows and request rows (ROO grouping).

``impressions_to_requests`` groups consecutive impression rows of a request into one request row and
writes each user's timeline once; ``requests_to_impressions`` merge-joins request rows with user rows
(both sorted by user_id) and explodes them back, attaching the history (timeline events with
ts < request ts) to every impression. Both read Parquet record batches and write row groups as they go:
memory holds one batch plus the rows of one user (impression side) or of the users of one batch
(request side), never a whole file.

Impression rows come in one of two orders (``IMPRESSION_ORDERS``): ``"user"``, the canonical
(user_id, ts, request_id, position), which the grouping reads, and ``"time"``, (ts, user_id,
request_id, position), a log as a server writes it, the requests of all users interleaved. A log in
any other order is first sorted to the user order in bounded memory (:mod:`sterling.data.sort`). Every ordering or consistency problem that would make the
conversion lossy raises :class:`~sterling.data.schema.DataError` naming the file, row, request and
user; the round trip impressions → requests → impressions reproduces the original table exactly
when its rows are in the canonical user order (a request's rows by position; other orders come back
in that order).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sterling.data.schema import (
    EVENT_PARTS,
    HISTORY_COLUMNS,
    IMPRESSIONS,
    ITEM_ID,
    POSITION,
    REQUEST_ID,
    TIMELINE_COLUMNS,
    TIMELINE_TS,
    TS,
    USER_ID,
    DataError,
    DatasetPaths,
    Roles,
    column_types,
    impressions_schema,
    list_array,
    open_writer,
    requests_schema,
    requests_table,
    users_schema,
    users_table,
    validate_impressions,
    validate_items,
    validate_requests,
    validate_users,
)
from sterling.data.sort import first_unsorted, sort_parquet

REQUEST_BATCH_ROWS = 1024
IMPRESSION_BATCH_ROWS = 8192
IMPRESSION_ORDERS = {"user": (USER_ID, TS, REQUEST_ID, POSITION), "time": (TS, USER_ID, REQUEST_ID, POSITION)}


def _column(table: pa.Table, name: str) -> pa.Array:
    return table.column(name).combine_chunks()


def _numpy(table: pa.Table, name: str, where: str) -> np.ndarray:
    column = table.column(name)
    if column.null_count:
        raise DataError(f"{where}: column {name!r} has {column.null_count} null values")
    return column.to_numpy()


def _list_parts(array: pa.Array, name: str, where: str) -> tuple[np.ndarray, pa.Array]:
    """Offsets [n + 1] from 0 and the flat values of a list array without null lists."""
    if array.null_count:
        raise DataError(f"{where}: list column {name!r} has {array.null_count} null lists")
    offsets = array.offsets.to_numpy().astype(np.int64)
    return offsets - offsets[0], pc.list_flatten(array)


def _numpy_lists(table: pa.Table, names: tuple[str, ...], where: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(offsets, numpy values) of list columns ``names``."""
    parts = [_list_parts(_column(table, name), name, where) for name in names]
    return [(offsets, values.to_numpy(zero_copy_only=False)) for offsets, values in parts]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(starts[i], starts[i] + lengths[i]) for all i."""
    ends = np.cumsum(lengths)
    return np.arange(ends[-1] if len(ends) else 0) - np.repeat(ends - lengths - starts, lengths)


def _gather_lists(values: pa.Array, starts: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return list_array(offsets, values.take(_ranges(starts, lengths)))


def _bad_label(columns: dict[str, pa.Array], roles: Roles) -> tuple[int, str] | None:
    """(impression index, message) of the first label value other than 0 or 1, if any."""
    for name in roles.labels:
        values = columns[name]
        bad = pc.fill_null(pc.invert(pc.is_in(values, pa.array([0, 1], values.type))), True)
        if pc.any(bad).as_py():
            index = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
            return index, f"label {name!r} is {values[index].as_py()!r}; labels are 0/1"
    return None


def _check_request_order(users, ts, requests, rows, previous, where: str) -> None:
    """Requests (one entry each, in file order) must be strictly increasing in (user_id, ts, request_id).

    ``previous`` is the (user, ts, request) key of the request before the first one, or None.
    """
    if previous is not None:
        users, ts, requests = (np.concatenate([[p], a]) for p, a in zip(previous, (users, ts, requests)))
        rows = np.concatenate([[-1], rows])
    du, dt, dq = np.diff(users), np.diff(ts), np.diff(requests)
    bad = (du < 0) | ((du == 0) & ((dt < 0) | ((dt == 0) & (dq <= 0))))
    if not bad.any():
        return
    i = int(np.flatnonzero(bad)[0])
    a, b, row = i, i + 1, rows[i + 1]
    if du[i] < 0:
        raise DataError(
            f"{where} row {row}: user {users[b]} follows user {users[a]}; a user's rows must be contiguous "
            f"and users sorted by user_id"
        )
    if dt[i] < 0:
        raise DataError(
            f"{where} row {row}: ts decreases for user {users[b]}: request {requests[b]} (ts {ts[b]}) follows "
            f"request {requests[a]} (ts {ts[a]})"
        )
    raise DataError(
        f"{where} row {row}: request {requests[b]} of user {users[b]} follows request {requests[a]} with the "
        f"same ts {ts[b]}; a request's rows must be contiguous and requests with equal ts sorted by request_id"
    )


@dataclass(frozen=True)
class JoinedBatch:
    """A batch of request rows joined with the rows of their users.

    Args:
        requests: R request rows in the canonical requests schema.
        users: the users.parquet rows of the batch's users (U rows, canonical users schema).
        user_index: int64 [R], the row of ``users`` of each request.
        history_length: int64 [R], how many timeline events of the user are strictly before the
            request's ts (the request's history is the first ``history_length`` events).
    """

    requests: pa.Table
    users: pa.Table
    user_index: np.ndarray
    history_length: np.ndarray


class _UserCursor:
    """Reads users.parquet in step with requests sorted by user, keeping only the rows still needed."""

    def __init__(self, path: Path, schema: pa.Schema, batch_rows: int) -> None:
        self._where = str(path)
        self._schema = schema
        self._batches = pq.ParquetFile(path).iter_batches(batch_size=batch_rows)
        self._buffer = schema.empty_table()
        self._ids = np.empty(0, np.int64)
        self._last = np.empty(0, np.int64)  # the last user id read, once one was
        self._rows_read = 0

    def _pull(self) -> bool:
        batch = next(self._batches, None)
        if batch is None:
            return False
        table = pa.Table.from_batches([batch]).cast(self._schema)
        where = f"{self._where} rows {self._rows_read}..{self._rows_read + table.num_rows - 1}"
        ids = _numpy(table, USER_ID, where)
        joined = np.concatenate([self._last, ids])
        bad = np.flatnonzero(np.diff(joined) <= 0)
        if len(bad):
            i = bad[0] + 1 - len(self._last)
            raise DataError(
                f"{self._where} row {self._rows_read + i}: user {ids[i]} after user {joined[bad[0]]}; users must be "
                f"unique and sorted by user_id"
            )
        _check_timelines(table, ids, where)
        self._last = ids[-1:]
        self._rows_read += table.num_rows
        self._buffer = pa.concat_tables([self._buffer, table])
        self._ids = np.concatenate([self._ids, ids])
        return True

    def take(self, user_ids: np.ndarray, request_ids: np.ndarray, rows: np.ndarray) -> tuple[pa.Table, np.ndarray]:
        """Rows for ``user_ids`` (sorted) and the index of each; earlier users are dropped for good."""
        while (not len(self._ids) or self._ids[-1] < user_ids[-1]) and self._pull():
            pass
        drop = int(np.searchsorted(self._ids, user_ids[0]))
        self._buffer, self._ids = self._buffer.slice(drop), self._ids[drop:]
        index = np.searchsorted(self._ids, user_ids)
        found = index < len(self._ids)
        found[found] = self._ids[index[found]] == user_ids[found]
        if not found.all():
            i = np.flatnonzero(~found)[0]
            raise DataError(
                f"requests row {rows[i]}: request {request_ids[i]} has user {user_ids[i]}, who has no row in {self._where}"
            )
        return self._buffer.slice(0, int(index[-1]) + 1), index


def _check_timelines(users: pa.Table, ids: np.ndarray, where: str) -> None:
    """Timeline lists of each user: equal lengths, no nulls, sorted by (ts, item_id)."""
    parts = _numpy_lists(users, TIMELINE_COLUMNS, where)
    lengths = [np.diff(offsets) for offsets, _ in parts]
    for name, length in zip(TIMELINE_COLUMNS[1:], lengths[1:]):
        if (length != lengths[0]).any():
            user = ids[np.flatnonzero(length != lengths[0])[0]]
            raise DataError(f"{where}: user {user}: {name} and {TIMELINE_COLUMNS[0]} differ in length")
    offsets = parts[0][0]
    unsorted = _first_unsorted(offsets[:-1], lengths[0], parts[0][1], parts[2][1])
    if unsorted is not None:
        raise DataError(f"{where}: the timeline of user {ids[unsorted]} is not sorted by (ts, item_id)")


def _first_unsorted(starts: np.ndarray, lengths: np.ndarray, items: np.ndarray, ts: np.ndarray) -> int | None:
    """The first event list (values[starts[i]:starts[i] + lengths[i]]) not sorted by (ts, item_id)."""
    index = _ranges(starts, lengths)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    item, t = items[index], ts[index]
    same = owner[1:] == owner[:-1]
    bad = np.flatnonzero(same & ((np.diff(t) < 0) | ((np.diff(t) == 0) & (np.diff(item) < 0))))
    return int(owner[bad[0]]) if len(bad) else None


def _history_lengths(users: pa.Table, user_index: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Per request, the number of its user's timeline events with ts < the request's ts."""
    [(offsets, values)] = _numpy_lists(users, (TIMELINE_TS,), "users")
    lengths = np.diff(offsets)
    timeline = values[_ranges(offsets[:-1], lengths)]
    _, rank = np.unique(np.concatenate([timeline, ts]), return_inverse=True)
    span = int(rank.max()) + 1
    # (user row, ts rank) as one sortable key: timelines are sorted by ts within each user.
    keys = np.repeat(np.arange(len(lengths)), lengths) * span + rank[: len(timeline)]
    found = np.searchsorted(keys, user_index * span + rank[len(timeline) :], side="left")
    return found - (np.cumsum(lengths) - lengths)[user_index]


def request_dataset_roles(paths: DatasetPaths) -> tuple[Roles, pa.Schema, pa.Schema]:
    """Roles of a request-format dataset (user roles from users.parquet) and its canonical schemas."""
    roles, request_schema = validate_requests(pq.read_schema(paths.requests), str(paths.requests))
    users_roles, user_schema = validate_users(pq.read_schema(paths.users), str(paths.users))
    return replace(roles, user=users_roles.user), request_schema, user_schema


def join_users(src_dir: str | Path, batch_rows: int = REQUEST_BATCH_ROWS) -> Iterator[JoinedBatch]:
    """Stream the request rows of a request-format dataset, ``batch_rows`` at a time, with their users.

    Checks the order (user_id, ts, request_id), that users.parquet is sorted and holds every request's
    user, and that every timeline is sorted by (ts, item_id).
    """
    paths = DatasetPaths(src_dir)
    _, request_schema, user_schema = request_dataset_roles(paths)
    where = str(paths.requests)
    cursor = _UserCursor(paths.users, user_schema, batch_rows)
    previous, row0 = None, 0
    for batch in pq.ParquetFile(paths.requests).iter_batches(batch_size=batch_rows):
        requests = pa.Table.from_batches([batch]).cast(request_schema)
        rows = row0 + np.arange(requests.num_rows)
        users, ts, request_ids = (_numpy(requests, name, where) for name in (USER_ID, TS, REQUEST_ID))
        _check_request_order(users, ts, request_ids, rows, previous, where)
        user_rows, user_index = cursor.take(users, request_ids, rows)
        yield JoinedBatch(requests, user_rows, user_index, _history_lengths(user_rows, user_index, ts))
        previous, row0 = (users[-1], ts[-1], request_ids[-1]), row0 + requests.num_rows


def _explode(batch: JoinedBatch, roles: Roles, schema: pa.Schema, where: str) -> pa.Table:
    """Impression rows [sum of impressions] of a joined batch of requests."""
    impressions = _column(batch.requests, IMPRESSIONS)
    if impressions.null_count:
        raise DataError(f"{where}: column 'impressions' has null lists")
    counts = pc.list_value_length(impressions).to_numpy()
    if (counts == 0).any():
        request = batch.requests.column(REQUEST_ID)[int(np.flatnonzero(counts == 0)[0])].as_py()
        raise DataError(f"{where}: request {request} has no impressions; the impression format cannot hold it")
    flat = pc.list_flatten(impressions)
    if flat.null_count:
        raise DataError(f"{where}: {flat.null_count} null impression structs")
    parent = np.repeat(np.arange(len(counts)), counts)
    user_row = batch.user_index[parent]
    columns = {f.name: array for f, array in zip(flat.type, flat.flatten())}
    bad = _bad_label(columns, roles)
    if bad:
        request = batch.requests.column(REQUEST_ID)[int(parent[bad[0]])].as_py()
        raise DataError(f"{where}: request {request}, impression {columns[POSITION][bad[0]].as_py()}: {bad[1]}")
    for name in (REQUEST_ID, USER_ID, TS, *roles.context):
        columns[name] = _column(batch.requests, name).take(parent)
    for name in roles.user:
        columns[name] = _column(batch.users, name).take(user_row)
    lengths = batch.history_length[parent]
    for history, timeline in zip(HISTORY_COLUMNS, TIMELINE_COLUMNS):
        offsets, values = _list_parts(_column(batch.users, timeline), timeline, where)
        columns[history] = _gather_lists(values, offsets[user_row], lengths)
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def _prepare_output(src: DatasetPaths, out_dir: str | Path) -> DatasetPaths:
    out = DatasetPaths(out_dir)
    if out.root.resolve() == src.root.resolve():
        raise ValueError(f"{out.root}: the output directory must differ from the source directory")
    out.root.mkdir(parents=True, exist_ok=True)
    validate_items(pq.read_schema(src.items), str(src.items))
    shutil.copyfile(src.items, out.path("items"))
    return out


def requests_to_impressions(
    src_dir: str | Path, out_dir: str | Path, batch_rows: int = REQUEST_BATCH_ROWS, order: str = "user"
) -> Path:
    """Write the impression-format dataset of a request-format one; returns ``out_dir``.

    Streams ``batch_rows`` requests at a time. Every request needs at least one impression.
    ``order`` is a key of ``IMPRESSION_ORDERS``: ``"user"`` streams straight out; ``"time"`` writes
    the user order to a temporary file and sorts it (:func:`sterling.data.sort.sort_parquet`).
    """
    if order not in IMPRESSION_ORDERS:
        raise ValueError(f"order must be one of {sorted(IMPRESSION_ORDERS)}, not {order!r}")
    src = DatasetPaths(src_dir)
    roles, request_schema, user_schema = request_dataset_roles(src)
    out = _prepare_output(src, out_dir)
    schema = impressions_schema(roles, {**column_types(request_schema), **column_types(user_schema)})
    with tempfile.TemporaryDirectory(dir=out.root, prefix=".group-") as tmp:
        path = out.path("impressions") if order == "user" else Path(tmp) / "user-order.parquet"
        with open_writer(path, schema) as writer:
            for batch in join_users(src.root, batch_rows):
                writer.write_table(_explode(batch, roles, schema, str(src.requests)))
        if order != "user":
            sort_parquet(path, out.path("impressions"), IMPRESSION_ORDERS[order])
    return out.root


def impressions_to_requests(src_dir: str | Path, out_dir: str | Path, batch_rows: int = IMPRESSION_BATCH_ROWS) -> Path:
    """Write the request-format dataset of an impression-format one; returns ``out_dir``.

    Impression rows in any order are accepted: a file not in the user order (``IMPRESSION_ORDERS``)
    is first sorted to it, in bounded memory, into a temporary file (error messages then count rows
    in that order). Reads ``batch_rows`` impression rows at a time and carries the rows of the last,
    possibly incomplete, user into the next batch. Validates: a request id appears once per user, ts
    is constant per request, context is constant per request, user features constant per user, the
    history is identical on all rows of a request, sorted, strictly before the request's ts, and each
    request's history is the part before its ts of the next request's history of the same user.
    """
    src = DatasetPaths(src_dir)
    roles, schema = validate_impressions(pq.read_schema(src.impressions), str(src.impressions))
    out = _prepare_output(src, out_dir)
    with tempfile.TemporaryDirectory(dir=out.root, prefix=".group-") as tmp:
        path, where = src.impressions, str(src.impressions)
        if first_unsorted(path, IMPRESSION_ORDERS["user"]) is not None:
            path = sort_parquet(path, Path(tmp) / "user-order.parquet", IMPRESSION_ORDERS["user"])
            where += " (rows counted in (user_id, ts, request_id, position) order)"
        _group(pq.ParquetFile(path), schema, RequestGrouper(roles, where), out, batch_rows)
    return out.root


def _group(pf: pq.ParquetFile, schema: pa.Schema, grouper: RequestGrouper, out: DatasetPaths, batch_rows: int) -> None:
    """Group the impression rows of ``pf`` (in user order) into out's requests and users files."""
    types, roles = column_types(schema), grouper.roles
    with (
        open_writer(out.path("requests"), requests_schema(roles, types)) as request_writer,
        open_writer(out.path("users"), users_schema(roles, types)) as user_writer,
    ):
        carry = schema.empty_table()
        for batch in pf.iter_batches(batch_size=batch_rows):
            chunk = pa.concat_tables([carry, pa.Table.from_batches([batch]).cast(schema)]).combine_chunks()
            users = _numpy(chunk, USER_ID, grouper.where)
            split = int(np.flatnonzero(np.concatenate([[True], users[1:] != users[:-1]]))[-1])
            if split:
                grouper.write(chunk.slice(0, split), request_writer, user_writer)
            carry = chunk.slice(split)
        if carry.num_rows:
            grouper.write(carry.combine_chunks(), request_writer, user_writer)


def _differs(values: pa.Array, reference: pa.Array) -> np.ndarray:
    """bool [n]: where values and reference differ (null equals null, NaN equals NaN)."""
    same = pc.or_(pc.fill_null(pc.equal(values, reference), False), pc.and_(pc.is_null(values), pc.is_null(reference)))
    if pa.types.is_floating(values.type):
        same = pc.or_(same, pc.fill_null(pc.and_(pc.is_nan(values), pc.is_nan(reference)), False))
    return ~same.to_numpy(zero_copy_only=False)


class RequestGrouper:
    """Validates and groups chunks of impression rows that hold whole users, in user order
    (``IMPRESSION_ORDERS["user"]``), chunk after chunk (it checks the order across chunks)."""

    def __init__(self, roles: Roles, where: str) -> None:
        self.roles, self.where = roles, where
        self.previous: tuple[int, int, int] | None = None
        self.row0 = 0

    def write(self, chunk: pa.Table, request_writer: pq.ParquetWriter, user_writer: pq.ParquetWriter) -> None:
        requests, users = self.group(chunk)
        request_writer.write_table(requests)
        user_writer.write_table(users)

    def group(self, chunk: pa.Table) -> tuple[pa.Table, pa.Table]:
        """The request rows and the user rows of ``chunk`` (whole users, in user order), validated."""
        roles, where = self.roles, self.where
        users, ts, request_ids = (_numpy(chunk, name, where) for name in (USER_ID, TS, REQUEST_ID))
        _numpy(chunk, ITEM_ID, where)
        first = np.concatenate([[True], (users[1:] != users[:-1]) | (request_ids[1:] != request_ids[:-1])])
        starts = np.flatnonzero(first)  # [R] first row of each request
        request_of_row = np.cumsum(first) - 1
        _check_request_order(users[starts], ts[starts], request_ids[starts], self.row0 + starts, self.previous, where)
        self._check_unique_requests(users[starts], ts[starts], request_ids[starts])
        user_first = np.concatenate([[True], users[1:] != users[:-1]])
        user_starts = np.flatnonzero(user_first)
        for name in (TS, *roles.context):
            self._check_constant(chunk, name, starts[request_of_row], users, request_ids, "request")
        for name in roles.user:
            self._check_constant(chunk, name, user_starts[np.cumsum(user_first) - 1], users, request_ids, "user")
        columns = {
            name: _column(chunk, name) for name in (ITEM_ID, POSITION, *roles.labels, *roles.impression_features)
        }
        bad = _bad_label(columns, roles)
        if bad:
            raise DataError(f"{where} row {self.row0 + bad[0]}: {bad[1]}")
        histories = _numpy_lists(chunk, HISTORY_COLUMNS, where)
        self._check_histories(histories, starts, request_of_row, users, ts, request_ids)

        request_columns = {
            name: _column(chunk, name).take(starts) for name in (REQUEST_ID, USER_ID, TS, *roles.context)
        }
        offsets = np.concatenate([starts, [chunk.num_rows]])
        last_rows = starts[np.concatenate([np.flatnonzero(np.diff(users[starts])), [len(starts) - 1]])]
        user_columns = {name: _column(chunk, name).take(last_rows) for name in (USER_ID, *roles.user)}
        lengths = np.diff(histories[0][0])[last_rows]
        events = {
            part: values[_ranges(offsets_[last_rows], lengths)]
            for part, (offsets_, values) in zip(EVENT_PARTS, histories)
        }
        self.previous = (users[-1], ts[-1], request_ids[-1])
        self.row0 += chunk.num_rows
        return (
            requests_table(roles, request_columns, offsets, columns),
            users_table(roles, user_columns, np.concatenate([[0], np.cumsum(lengths)]), events),
        )

    def _check_unique_requests(self, users: np.ndarray, ts: np.ndarray, request_ids: np.ndarray) -> None:
        """Each (user, request id) once: rows of one request at two ts values come out as two groups."""
        key = np.lexsort((request_ids, users))
        same = np.flatnonzero((np.diff(users[key]) == 0) & (np.diff(request_ids[key]) == 0))
        if len(same):
            a, b = key[same[0]], key[same[0] + 1]
            raise DataError(
                f"{self.where}: request {request_ids[a]} of user {users[a]} has rows at ts {ts[a]} and ts {ts[b]}; "
                f"column 'ts' must be constant per request"
            )

    def _check_constant(self, chunk, name, reference_rows, users, request_ids, unit: str) -> None:
        values = _column(chunk, name)
        bad = np.flatnonzero(_differs(values, values.take(reference_rows)))
        if len(bad):
            row, first = bad[0], reference_rows[bad[0]]
            owner = f"request {request_ids[row]} of user {users[row]}" if unit == "request" else f"user {users[row]}"
            raise DataError(
                f"{self.where}: {owner}: column {name!r} is {values[row].as_py()!r} at row {self.row0 + row} but "
                f"{values[first].as_py()!r} at row {self.row0 + first}; it must be constant per {unit}"
            )

    def _check_histories(self, histories, starts, request_of_row, users, ts, request_ids) -> None:
        where, row0 = self.where, self.row0
        offsets = histories[0][0]
        lengths = np.diff(offsets)
        for name, (other, _) in zip(HISTORY_COLUMNS[1:], histories[1:]):
            bad = np.flatnonzero(np.diff(other) != lengths)
            if len(bad):
                raise DataError(f"{where} row {row0 + bad[0]}: {name} and {HISTORY_COLUMNS[0]} differ in length")
        # Every row of a request carries the same history as its first row.
        reference = starts[request_of_row]
        bad = np.flatnonzero(lengths != lengths[reference])
        if not len(bad):
            own = _ranges(offsets[:-1], lengths)
            copy = _ranges(offsets[reference], lengths)
            mismatch = np.zeros(len(own), bool)
            for _, values in histories:
                mismatch |= values[own] != values[copy]
            bad = np.unique(np.repeat(np.arange(len(lengths)), lengths)[mismatch])
        if len(bad):
            row = bad[0]
            raise DataError(
                f"{where} row {row0 + row}: request {request_ids[row]} of user {users[row]} has a different history "
                f"than its row {row0 + reference[row]}; the history must be the same on every row of a request"
            )
        self._check_requests_histories(histories, starts, users[starts], ts[starts], request_ids[starts])

    def _check_requests_histories(self, histories, starts, request_users, request_ts, request_id) -> None:
        where = self.where
        offsets = histories[0][0]
        begin, length = offsets[starts], np.diff(offsets)[starts]
        index = _ranges(begin, length)
        owner = np.repeat(np.arange(len(starts)), length)
        event_ts = histories[2][1][index]
        leak = np.flatnonzero(event_ts >= request_ts[owner])
        if len(leak):
            r = owner[leak[0]]
            raise DataError(
                f"{where}: request {request_id[r]} of user {request_users[r]} (ts {request_ts[r]}) has a history "
                f"event at ts {event_ts[leak[0]]}; history must be strictly before the request (leakage)"
            )
        r = _first_unsorted(begin, length, histories[0][1], histories[2][1])
        if r is not None:
            raise DataError(
                f"{where}: history of request {request_id[r]} of user {request_users[r]} is not sorted by (ts, item_id)"
            )
        # Each request's history is the part before its ts of the next history of the same user.
        a = np.flatnonzero(request_users[1:] == request_users[:-1])
        b = a + 1
        short = np.flatnonzero(length[b] < length[a])
        if len(short):
            i = short[0]
            raise DataError(
                f"{where}: user {request_users[a[i]]}: request {request_id[b[i]]} has a shorter history than the "
                f"earlier request {request_id[a[i]]}"
            )
        own, later = _ranges(begin[a], length[a]), _ranges(begin[b], length[a])
        mismatch = np.zeros(len(own), bool)
        for _, values in histories:
            mismatch |= values[own] != values[later]
        pair = np.repeat(np.arange(len(a)), length[a])[mismatch]
        extra = np.flatnonzero(length[b] > length[a])
        late = extra[histories[2][1][begin[b][extra] + length[a][extra]] < request_ts[a][extra]]
        bad = np.union1d(pair, late)
        if len(bad):
            i = bad[0]
            raise DataError(
                f"{where}: user {request_users[a[i]]}: the history of request {request_id[a[i]]} (ts {request_ts[a[i]]}) "
                f"is not the part before ts {request_ts[a[i]]} of the next request {request_id[b[i]]}'s history"
            )
