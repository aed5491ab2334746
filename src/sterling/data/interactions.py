"""Any interaction log as a request-format dataset (``sterling data interactions``).

Inputs, the format taken from ``format`` or the file name (``.parquet`` → parquet, ``.csv`` → csv,
anything else → text):

* **csv / parquet**: one row per interaction with a user column (default ``user_id``), an item
  column (``item_id``) and optionally a timestamp column (``timestamp``: used when the file has it;
  a ``ts_col`` named explicitly must exist), binary label columns (``label_cols``) and impression
  feature columns (``feature_cols``, scalars); other columns are ignored.
* **text** (sequential-recommendation data such as SASRec's or BERT4Rec's): lines
  ``user item [item ...]``, whitespace-separated, each user's items oldest first. A user may span
  several lines (read in file order), so the one-pair-per-line form is the same format; ``pairs``
  checks that every line holds exactly two fields. Text logs have no timestamps, labels or features.

Ids: integer user and item ids are kept as they are (int64). String ids (a CSV/Parquet string
column, or a text token that is not an integer) are mapped to dense int64 ids ``1..N`` in the sorted
order of the strings, users and items separately; the mapping is written to ``ids.parquet``
(``kind`` "user" / "item", ``id`` int64, ``source_id`` string) and, for items, as the display column
``source_id`` of items.parquet. Float or null ids are errors.

Requests: with timestamps (integer unix seconds, or an Arrow timestamp column, cast to seconds), a
user's interactions sorted by (ts, item_id) are cut greedily: a request starts with the first
interaction not yet taken and holds every following one with ts < start ts + ``window_s`` (as for
MovieLens, :mod:`sterling.data.movielens`); the request ts is its first interaction's, so a request's
history never holds its own interactions. **Without timestamps, every interaction is its own request
and gets the synthetic ts 0, 1, 2, ... = its position in the user's sequence**, so the order is kept
and each request's history is exactly the interactions before it.

Labels: the ``label_cols`` (bool or integer 0/1, at most 8) are the impression labels, label j being
bit j of the timeline action; without them every interaction gets the one label ``click`` = 1.
users.parquet holds every interaction in the timeline (no user features).

Items: items.parquet has one row per item id seen in the log or in the attribute table
(``items_path``, CSV or Parquet, keyed by the same item column), sorted by id. The table's integer,
string and list<string> columns become attributes (filterable; a CSV string column holding a ``|``
anywhere is read as ``|``-separated lists), ``display_cols`` and other types (floats, ...) display
columns; an item the table lacks has null attributes. Without a table, items.parquet holds the ids only.

Example::

    from sterling.data.interactions import InteractionOptions, load_interactions
    load_interactions("log.csv", "runs/mylog", InteractionOptions(label_cols=("click", "buy")))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from sterling.data.schema import (
    ACTION,
    ITEM_ID,
    POSITION,
    REQUEST_ID,
    TS,
    USER_ID,
    DataError,
    DatasetPaths,
    Roles,
    items_table,
    requests_table,
    users_table,
    write_table,
)

DEFAULT_WINDOW_S = 600
FORMATS = ("text", "pairs", "csv", "parquet")
DEFAULT_LABEL = "click"
LIST_SEPARATOR = "|"
IDS_FILE = "ids.parquet"
SOURCE_ID = "source_id"
_MAX_TS = 1 << 34  # what sterling.data.batch.UserTimelines accepts


@dataclass(frozen=True)
class InteractionOptions:
    """How to read an interaction log (module docstring). ``ts_col`` None: ``timestamp`` when the
    file has it; ``window_s``: seconds a request spans when there are timestamps."""

    format: str | None = None
    user_col: str = USER_ID
    item_col: str = ITEM_ID
    ts_col: str | None = None
    label_cols: tuple[str, ...] = ()
    feature_cols: tuple[str, ...] = ()
    items_path: Path | None = None
    display_cols: tuple[str, ...] = ()
    window_s: int = DEFAULT_WINDOW_S

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; expected one of {FORMATS}")
        if self.window_s < 1:
            raise ValueError(f"window_s must be at least 1 second, got {self.window_s}")


@dataclass(frozen=True)
class Events:
    """Interactions sorted by (user, ts, item), each array ``[n]``: ``user``, ``item``, ``ts`` int64;
    ``labels``: name → int8 0/1 (label j is bit j of the timeline action); ``features``: name →
    impression feature values."""

    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray
    labels: Mapping[str, np.ndarray]
    features: Mapping[str, Any] = field(default_factory=dict)


def first_of_runs(values: np.ndarray) -> np.ndarray:
    """Index of the first element of each run of equal ``values`` (e.g. each user's first event)."""
    return np.flatnonzero(np.concatenate([[True], values[1:] != values[:-1]])) if len(values) else np.zeros(0, int)


def request_starts(user: np.ndarray, ts: np.ndarray, window_s: int) -> np.ndarray:
    """First interaction of each request (interactions sorted by user, ts): the greedy window of the
    module docstring. int64 ``[R]``."""
    bounds = np.append(first_of_runs(user), len(user))
    starts = []
    for begin, end in zip(bounds[:-1], bounds[1:]):
        i = begin
        while i < end:
            starts.append(i)
            i = begin + int(np.searchsorted(ts[begin:end], ts[i] + window_s, side="left"))
    return np.array(starts, np.int64)


def write_dataset(
    out_dir: str | Path,
    events: Events,
    starts: np.ndarray,
    items: Mapping[str, Any],
    attributes: tuple[str, ...] = (),
    display: tuple[str, ...] = (),
    context: Callable[[np.ndarray], dict[str, Any]] | None = None,
    users: Mapping[str, Any] | None = None,
) -> Path:
    """Write requests/users/items.parquet: request r holds events ``starts[r]:starts[r + 1]``.

    Args:
        items: item_id and the ``attributes`` / ``display`` columns of items.parquet.
        context: request ts int64 ``[R]`` → context columns ``[R]``.
        users: user feature columns, one value per distinct user of ``events`` (sorted by user id).
    """
    user, item, ts = events.user, events.item, events.ts
    bounds = np.concatenate([starts, [len(user)]])
    request_of_event = np.repeat(np.arange(len(starts)), np.diff(bounds))
    requests = {REQUEST_ID: np.arange(1, len(starts) + 1, dtype=np.int64), USER_ID: user[starts], TS: ts[starts]}
    requests.update(context(ts[starts]) if context else {})
    positions = (np.arange(len(user)) - starts[request_of_event]).astype(np.int16)
    impressions = {ITEM_ID: item, POSITION: positions, **events.labels, **events.features}
    user_starts = first_of_runs(user)
    user_columns = {USER_ID: user[user_starts], **(users or {})}
    action = np.zeros(len(user), np.int16)
    for j, values in enumerate(events.labels.values()):
        action |= np.asarray(values).astype(np.int16) << j
    timeline = {ITEM_ID: item, ACTION: action.astype(np.int8), TS: ts}
    roles = Roles(
        format="requests",
        context=tuple(name for name in requests if name not in (REQUEST_ID, USER_ID, TS)),
        user=tuple(users or ()),
        labels=tuple(events.labels),
        impression_features=tuple(events.features),
        attributes=attributes,
        display=display,
    )
    out = DatasetPaths(out_dir)
    out.root.mkdir(parents=True, exist_ok=True)
    write_table(requests_table(roles, requests, bounds, impressions), out.path("requests"))
    user_bounds = np.concatenate([user_starts, [len(user)]])
    write_table(users_table(roles, user_columns, user_bounds, timeline), out.path("users"))
    write_table(items_table(roles, items), out.path("items"))
    return out.root


def detect_format(path: Path) -> str:
    """``parquet`` / ``csv`` from the file name, else ``text``."""
    suffix = path.suffix.lower()
    return {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}.get(suffix, "text")


def _read_table(path: Path, fmt: str) -> pa.Table:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return pq.read_table(path) if fmt == "parquet" else pacsv.read_csv(path)
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: cannot read it as {fmt} ({e})") from None


def _column(table: pa.Table, name: str, what: str, where: Path) -> pa.Array:
    if name not in table.column_names:
        raise DataError(f"{where}: no {what} column {name!r} (columns: {table.column_names})")
    column = table.column(name).combine_chunks()
    if column.null_count:
        raise DataError(f"{where}: {what} column {name!r} has {column.null_count} empty values")
    return column


def _read_text(path: Path, fmt: str) -> tuple[pa.Array, pa.Array]:
    """User and item tokens of a text log, one per interaction, in file order."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    users, items = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) == 1:
            raise DataError(f"{path} line {number}: user {fields[0]!r} with no items")
        if fmt == "pairs" and len(fields) != 2:
            raise DataError(f"{path} line {number}: {len(fields)} fields; the pairs format has `user item`")
        users += [fields[0]] * (len(fields) - 1)
        items += fields[1:]
    return _tokens(users), _tokens(items)


def _tokens(tokens: list[str]) -> pa.Array:
    """Integer tokens as int64, else the strings."""
    try:
        return pa.array(np.array(tokens).astype(np.int64))
    except (ValueError, OverflowError):
        return pa.array(tokens, pa.string())


def _dense_ids(columns: list[pa.Array], what: str, where: Path) -> tuple[list[np.ndarray], np.ndarray | None]:
    """int64 ids of each column: integers as they are; strings (any column) mapped to ``1..N`` in
    sorted order, with the source strings ``[N]`` (None: not mapped)."""
    for column in columns:
        t = column.type
        if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise DataError(f"{where}: {what} ids must be integers or strings, not {t}")
    if all(pa.types.is_integer(c.type) for c in columns):
        return [c.to_numpy().astype(np.int64) for c in columns], None
    strings = [c.cast(pa.string()).to_numpy(zero_copy_only=False).astype(str) for c in columns]
    source = np.unique(np.concatenate(strings))
    return [np.searchsorted(source, s).astype(np.int64) + 1 for s in strings], source


def _timestamps(column: pa.Array, name: str, where: Path) -> np.ndarray:
    if pa.types.is_timestamp(column.type):
        column = pc.cast(column, pa.timestamp("s"), safe=False).cast(pa.int64())
    if not pa.types.is_integer(column.type):
        raise DataError(f"{where}: timestamp column {name!r} must hold integer unix seconds, not {column.type}")
    ts = column.to_numpy().astype(np.int64)
    if len(ts) and (ts.min() < 0 or ts.max() >= _MAX_TS):
        raise DataError(f"{where}: timestamp column {name!r} must be unix seconds in [0, 2**34)")
    return ts


def _label(column: pa.Array, name: str, where: Path) -> np.ndarray:
    if not (pa.types.is_boolean(column.type) or pa.types.is_integer(column.type)):
        raise DataError(f"{where}: label column {name!r} must be 0/1 (bool or integer), not {column.type}")
    values = column.to_numpy(zero_copy_only=False).astype(np.int64)
    if not np.isin(values, (0, 1)).all():
        raise DataError(f"{where}: label column {name!r} holds {values[~np.isin(values, (0, 1))][0]}, not 0/1")
    return values.astype(np.int8)


def _item_columns(path: Path, item_col: str, display_cols: tuple[str, ...]) -> tuple[pa.Array, dict[str, pa.Array]]:
    """The attribute table's item ids and its other columns (CSV ``|``-strings split into lists)."""
    fmt = detect_format(path)
    table = _read_table(path, "csv" if fmt == "text" else fmt)
    ids = _column(table, item_col, "item", path)
    missing = [name for name in display_cols if name not in table.column_names]
    if missing:
        raise DataError(f"{path}: no display columns {missing} (columns: {table.column_names})")
    columns = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if name != item_col and fmt == "csv" and pa.types.is_string(column.type) and name not in display_cols:
            if pc.any(pc.match_substring(column, LIST_SEPARATOR)).as_py():
                lists = [value.split(LIST_SEPARATOR) if value else [] for value in column.to_pylist()]
                column = pa.array(lists, pa.list_(pa.string()))
        if name != item_col:
            columns[name] = column
    return ids, columns


def _is_attribute(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_string(t) or (pa.types.is_list(t) and pa.types.is_string(t.value_type))


def _read_log(path: Path, options: InteractionOptions) -> tuple[pa.Array, pa.Array, np.ndarray | None, dict, dict]:
    """user, item (Arrow), ts (None: none), labels, features of the log, in file order."""
    fmt = options.format or detect_format(path)
    if fmt in ("text", "pairs"):
        user, item = _read_text(path, fmt)
        if options.ts_col or options.label_cols or options.feature_cols:
            raise DataError(f"{path}: a {fmt} log has no timestamp, label or feature columns")
        return user, item, None, {}, {}
    table = _read_table(path, fmt)
    user = _column(table, options.user_col, "user", path)
    item = _column(table, options.item_col, "item", path)
    ts_col = options.ts_col or ("timestamp" if "timestamp" in table.column_names else None)
    ts = _timestamps(_column(table, ts_col, "timestamp", path), ts_col, path) if ts_col else None
    labels = {name: _label(_column(table, name, "label", path), name, path) for name in options.label_cols}
    features = {}
    for name in options.feature_cols:
        if name not in table.column_names:
            raise DataError(f"{path}: no feature column {name!r} (columns: {table.column_names})")
        features[name] = table.column(name).combine_chunks()
    return user, item, ts, labels, features


def load_interactions(src: str | Path, out_dir: str | Path, options: InteractionOptions = InteractionOptions()) -> Path:
    """Convert the interaction log ``src`` into a request-format dataset in ``out_dir`` (module
    docstring); returns ``out_dir``."""
    path = Path(src)
    user_raw, item_raw, ts, labels, features = _read_log(path, options)
    if len(user_raw) == 0:
        raise DataError(f"{path}: no interactions")
    table_ids, table_columns = None, {}
    if options.items_path is not None:
        table_ids, table_columns = _item_columns(Path(options.items_path), options.item_col, options.display_cols)
    (user,), user_source = _dense_ids([user_raw], "user", path)
    item_arrays = [item_raw] if table_ids is None else [item_raw, table_ids]
    item_ids, item_source = _dense_ids(item_arrays, "item", path)
    item = item_ids[0]

    n = len(user)
    if ts is None:  # one request per interaction, at ts = its position in the user's sequence
        order = np.argsort(user, kind="stable")
        first = first_of_runs(user[order])
        ts = np.arange(n) - np.repeat(first, np.diff(np.append(first, n)))
        starts = np.arange(n)
    else:
        order = np.lexsort((item, ts, user))
        ts = ts[order]
        starts = request_starts(user[order], ts, options.window_s)
    if not labels:
        labels = {DEFAULT_LABEL: np.ones(n, np.int8)}
    events = Events(
        user[order],
        item[order],
        ts,
        {name: values[order] for name, values in labels.items()},
        {name: values.take(pa.array(order)) for name, values in features.items()},
    )

    all_items = np.unique(np.concatenate(item_ids))
    items: dict[str, Any] = {ITEM_ID: all_items}
    attributes, display = [], list(options.display_cols)
    if table_ids is not None:
        table_item = item_ids[1]
        unique, counts = np.unique(table_item, return_counts=True)
        if (counts > 1).any():
            duplicate = unique[counts > 1][0]
            shown = item_source[duplicate - 1] if item_source is not None else duplicate
            raise DataError(f"{options.items_path}: item {shown} has {counts[counts > 1][0]} rows")
        index = np.full(len(all_items), -1)
        index[np.searchsorted(all_items, table_item)] = np.arange(len(table_item))
        rows = pa.array(index, mask=index < 0)
        for name, column in table_columns.items():
            items[name] = column.take(rows)
            if name not in display:
                (attributes if _is_attribute(column.type) else display).append(name)
    if item_source is not None:
        items[SOURCE_ID] = item_source[all_items - 1]
        display.append(SOURCE_ID)
    out = write_dataset(out_dir, events, starts, items, tuple(attributes), tuple(display))
    _write_ids(out, user_source, all_items, item_source)
    return out


def _write_ids(out: Path, user_source: np.ndarray | None, items: np.ndarray, item_source: np.ndarray | None) -> None:
    """ids.parquet: the string → int64 id mapping (only when some ids were strings)."""
    parts = []
    if user_source is not None:
        parts.append(("user", np.arange(1, len(user_source) + 1), user_source))
    if item_source is not None:
        parts.append(("item", items, item_source[items - 1]))
    path = out / IDS_FILE
    if not parts:
        path.unlink(missing_ok=True)
        return
    table = pa.table(
        {
            "kind": pa.array([kind for kind, ids, _ in parts for _ in ids], pa.string()),
            "id": np.concatenate([ids for _, ids, _ in parts]).astype(np.int64),
            SOURCE_ID: pa.array(np.concatenate([source for _, _, source in parts]), pa.string()),
        }
    )
    pq.write_table(table, path, compression="zstd")
