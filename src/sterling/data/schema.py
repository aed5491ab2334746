"""Arrow schemas of sterling datasets: request rows (ROO), users, items and impression rows.

A *request-format dataset* is a directory with three zstd Parquet files::

    requests.parquet   one row per request, sorted by (user_id, ts, request_id)
        request_id int64, user_id int64, ts int64 (unix seconds), <context columns>,
        impressions: list<struct<item_id int64, position int16, <labels int8>..., <impression features>...>>
    users.parquet      one row per user, sorted by user_id
        user_id int64, <user feature columns>,
        timeline_item_id list<int64>, timeline_action list<int8>, timeline_ts list<int64>
        (equal lengths per row, sorted by (ts, item_id); action bit j = label j)
    items.parquet      item_id int64, <attribute columns>, <display columns>

An *impression-format dataset* holds ``impressions.parquet`` (and the same ``items.parquet``): one row
per impression with request_id, user_id, ts, context, user features, item_id, position, labels,
impression features and the history lists ``history_item_id/history_action/history_ts`` (the user's
timeline strictly before ``ts``), in the order (user_id, ts, request_id, position in the request).

Every file carries the column roles as JSON under the schema metadata key ``b"sterling"`` (see
:class:`Roles`). Readers accept ``large_list``/``large_string`` columns (as written by Polars) and
cast them to the canonical ``list``/``string`` types of the builders below.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

METADATA_KEY = b"sterling"
FORMAT_VERSION = 1
FORMATS = ("requests", "users", "items", "impressions")
FILE_NAMES = {fmt: f"{fmt}.parquet" for fmt in FORMATS}
COMPRESSION = "zstd"
MAX_LABELS = 8  # the action bitmask is an int8

REQUEST_ID = "request_id"
USER_ID = "user_id"
TS = "ts"
ITEM_ID = "item_id"
POSITION = "position"
IMPRESSIONS = "impressions"
ACTION = "action"
TIMELINE_ITEM_ID = "timeline_item_id"
TIMELINE_ACTION = "timeline_action"
TIMELINE_TS = "timeline_ts"
HISTORY_ITEM_ID = "history_item_id"
HISTORY_ACTION = "history_action"
HISTORY_TS = "history_ts"
TIMELINE_COLUMNS = (TIMELINE_ITEM_ID, TIMELINE_ACTION, TIMELINE_TS)
HISTORY_COLUMNS = (HISTORY_ITEM_ID, HISTORY_ACTION, HISTORY_TS)
# The parts of one timeline event, in the order of TIMELINE_COLUMNS / HISTORY_COLUMNS.
EVENT_PARTS = (ITEM_ID, ACTION, TS)
EVENT_TYPES = (pa.int64(), pa.int8(), pa.int64())
RESERVED = frozenset({REQUEST_ID, USER_ID, TS, ITEM_ID, POSITION, IMPRESSIONS, *TIMELINE_COLUMNS, *HISTORY_COLUMNS})


class SchemaError(ValueError):
    """A file's Arrow schema or roles metadata does not match the sterling format."""


class DataError(ValueError):
    """A file's rows break the format (order, duplicates, leakage, inconsistent copies)."""


class DatasetFileMissing(FileNotFoundError):
    """A dataset directory lacks a file its format needs."""


@dataclass(frozen=True)
class Roles:
    """Which columns play which role; stored as JSON in every file's schema metadata.

    Args:
        format: the file kind, one of ``requests``, ``users``, ``items``, ``impressions``.
        context: request-level feature columns (scalar), e.g. ``surface``, ``hour``.
        user: user feature columns (scalar, constant per user), e.g. ``age_bucket``.
        labels: int8 0/1 label columns of an impression; label j is bit j of the action bitmask.
        impression_features: per-impression feature columns (scalar), e.g. ``item_age_days``.
        attributes: item attribute columns (string, integer or list<string>).
        display: item display columns (e.g. ``title``), never used as features.
        version: the format version, currently 1.
    """

    format: str
    context: tuple[str, ...] = ()
    user: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    impression_features: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()
    display: tuple[str, ...] = ()
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise SchemaError(f"unknown format {self.format!r}; expected one of {FORMATS}")
        if self.version != FORMAT_VERSION:
            raise SchemaError(f"unsupported format version {self.version}; this sterling reads {FORMAT_VERSION}")
        if len(self.labels) > MAX_LABELS:
            raise SchemaError(f"{len(self.labels)} labels; the int8 action bitmask holds at most {MAX_LABELS}")
        for group in (self.row_columns, self.attributes + self.display):
            for name in group:
                if name in RESERVED:
                    raise SchemaError(f"column {name!r} is reserved and cannot be a role column")
            duplicates = sorted({n for n in group if group.count(n) > 1})
            if duplicates:
                raise SchemaError(f"columns {duplicates} are named in more than one role")

    @property
    def row_columns(self) -> tuple[str, ...]:
        """Context, user, label and impression-feature columns: those of an impression row."""
        return self.context + self.user + self.labels + self.impression_features

    def as_format(self, fmt: str) -> Roles:
        """The same roles for another file kind of the dataset."""
        return replace(self, format=fmt)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str = "schema") -> Roles:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise SchemaError(f"{where}: sterling metadata is not JSON ({e})") from None
        if not isinstance(data, dict) or "format" not in data:
            raise SchemaError(f"{where}: sterling metadata must be a JSON object with a 'format' key")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise SchemaError(f"{where}: unknown keys {unknown} in sterling metadata")
        lists = {k: v for k, v in data.items() if k not in ("format", "version")}
        for key, names in lists.items():
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise SchemaError(f"{where}: sterling metadata key {key!r} must be a list of column names")
        lists = {k: tuple(v) for k, v in lists.items()}
        return cls(format=data["format"], version=data.get("version", FORMAT_VERSION), **lists)


def read_roles(schema: pa.Schema, where: str = "schema") -> Roles:
    """The :class:`Roles` stored in ``schema``'s metadata; ``where`` names the file in errors."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise SchemaError(f"{where}: no b'sterling' roles metadata in the Arrow schema")
    return Roles.from_json(raw, where)


def with_roles(schema: pa.Schema, roles: Roles) -> pa.Schema:
    """``schema`` with ``roles`` stored under b"sterling" (other metadata kept)."""
    metadata = dict(schema.metadata or {})
    metadata[METADATA_KEY] = roles.to_json()
    return schema.with_metadata(metadata)


def list_of(value_type: pa.DataType) -> pa.DataType:
    """The canonical list type (32-bit offsets, child named ``element`` as Parquet writes it)."""
    return pa.list_(pa.field("element", value_type))


def canonical(t: pa.DataType) -> pa.DataType:
    """``t`` with large_list → list and large_string → string, recursively."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return list_of(canonical(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, canonical(f.type)) for f in t])
    if pa.types.is_large_string(t):
        return pa.string()
    return t


def _is_scalar(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_string(t) or pa.types.is_boolean(t)


def _is_attribute(t: pa.DataType) -> bool:
    is_value = pa.types.is_integer(t) or pa.types.is_string(t)
    return is_value or (pa.types.is_list(t) and pa.types.is_string(t.value_type))


def _typed(names: tuple[str, ...], types: Mapping[str, pa.DataType], kind: str, check) -> list[pa.Field]:
    fields = []
    for name in names:
        if name not in types:
            raise SchemaError(f"missing {kind} column {name!r} (no type given)")
        t = canonical(types[name])
        if not check(t):
            raise SchemaError(f"{kind} column {name!r} has unsupported type {t}")
        fields.append(pa.field(name, t))
    return fields


def _label_fields(roles: Roles) -> list[pa.Field]:
    return [pa.field(name, pa.int8()) for name in roles.labels]


def _event_fields(names: tuple[str, ...]) -> list[pa.Field]:
    return [pa.field(name, list_of(t)) for name, t in zip(names, EVENT_TYPES)]


def impression_struct(roles: Roles, types: Mapping[str, pa.DataType]) -> pa.DataType:
    """``struct<item_id int64, position int16, <labels int8>..., <impression features>...>``."""
    fields = [pa.field(ITEM_ID, pa.int64()), pa.field(POSITION, pa.int16()), *_label_fields(roles)]
    fields += _typed(roles.impression_features, types, "impression feature", _is_scalar)
    return pa.struct(fields)


def requests_schema(roles: Roles, types: Mapping[str, pa.DataType]) -> pa.Schema:
    """Schema of requests.parquet; ``types`` maps context and impression feature columns to types."""
    fields = [pa.field(REQUEST_ID, pa.int64()), pa.field(USER_ID, pa.int64()), pa.field(TS, pa.int64())]
    fields += _typed(roles.context, types, "context", _is_scalar)
    fields.append(pa.field(IMPRESSIONS, list_of(impression_struct(roles, types))))
    return with_roles(pa.schema(fields), roles.as_format("requests"))


def users_schema(roles: Roles, types: Mapping[str, pa.DataType]) -> pa.Schema:
    """Schema of users.parquet; ``types`` maps the user feature columns to types."""
    fields = [pa.field(USER_ID, pa.int64()), *_typed(roles.user, types, "user", _is_scalar)]
    fields += _event_fields(TIMELINE_COLUMNS)
    return with_roles(pa.schema(fields), roles.as_format("users"))


def items_schema(roles: Roles, types: Mapping[str, pa.DataType]) -> pa.Schema:
    """Schema of items.parquet; ``types`` maps attribute and display columns to types."""
    fields = [pa.field(ITEM_ID, pa.int64()), *_typed(roles.attributes, types, "attribute", _is_attribute)]
    fields += _typed(roles.display, types, "display", lambda t: True)
    return with_roles(pa.schema(fields), roles.as_format("items"))


def impressions_schema(roles: Roles, types: Mapping[str, pa.DataType]) -> pa.Schema:
    """Schema of impressions.parquet; ``types`` maps context, user and impression feature columns."""
    fields = [pa.field(REQUEST_ID, pa.int64()), pa.field(USER_ID, pa.int64()), pa.field(TS, pa.int64())]
    fields += _typed(roles.context, types, "context", _is_scalar)
    fields += _typed(roles.user, types, "user", _is_scalar)
    fields += list(impression_struct(roles, types))
    fields += _event_fields(HISTORY_COLUMNS)
    return with_roles(pa.schema(fields), roles.as_format("impressions"))


SCHEMA_BUILDERS = {
    "requests": requests_schema,
    "users": users_schema,
    "items": items_schema,
    "impressions": impressions_schema,
}


def column_types(schema: pa.Schema) -> dict[str, pa.DataType]:
    """Canonical type of every column of a sterling file, impression struct fields included."""
    types = {f.name: canonical(f.type) for f in schema}
    if IMPRESSIONS in types and pa.types.is_list(types[IMPRESSIONS]):
        value_type = types[IMPRESSIONS].value_type
        if pa.types.is_struct(value_type):
            types.update({f.name: f.type for f in value_type})
    return types


def validate_schema(schema: pa.Schema, fmt: str, where: str) -> tuple[Roles, pa.Schema]:
    """Check ``schema`` is a sterling ``fmt`` file; returns its roles and canonical schema.

    Raises :class:`SchemaError` naming ``where`` and the column at fault: missing roles metadata, a
    format other than ``fmt``, a missing column, a column no role names, or a wrong type.
    """
    roles = read_roles(schema, where)
    if roles.format != fmt:
        raise SchemaError(f"{where}: roles metadata says format {roles.format!r}, expected {fmt!r}")
    try:
        expected = SCHEMA_BUILDERS[fmt](roles, column_types(schema))
    except SchemaError as e:
        raise SchemaError(f"{where}: {e}") from None
    _compare(schema, expected, where)
    return roles, expected.with_metadata(schema.metadata)


def _compare(schema: pa.Schema, expected: pa.Schema, where: str) -> None:
    missing = [n for n in expected.names if n not in schema.names]
    if missing:
        raise SchemaError(f"{where}: missing columns {missing}")
    extra = [n for n in schema.names if n not in expected.names]
    if extra:
        raise SchemaError(f"{where}: columns {extra} are not named by any role in the metadata")
    if schema.names != expected.names:
        raise SchemaError(f"{where}: columns are in order {schema.names}, expected {expected.names}")
    for field, want in zip(schema, expected):
        if canonical(field.type) != want.type:
            raise SchemaError(f"{where}: column {field.name!r} has type {field.type}, expected {want.type}")


def validate_requests(schema: pa.Schema, where: str = FILE_NAMES["requests"]) -> tuple[Roles, pa.Schema]:
    return validate_schema(schema, "requests", where)


def validate_users(schema: pa.Schema, where: str = FILE_NAMES["users"]) -> tuple[Roles, pa.Schema]:
    return validate_schema(schema, "users", where)


def validate_items(schema: pa.Schema, where: str = FILE_NAMES["items"]) -> tuple[Roles, pa.Schema]:
    return validate_schema(schema, "items", where)


def validate_impressions(schema: pa.Schema, where: str = FILE_NAMES["impressions"]) -> tuple[Roles, pa.Schema]:
    return validate_schema(schema, "impressions", where)


@dataclass(frozen=True)
class DatasetPaths:
    """The files of a dataset directory; each property raises :class:`DatasetFileMissing` if absent."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    def path(self, fmt: str) -> Path:
        """Where the ``fmt`` file lives, whether or not it exists (for writers)."""
        return self.root / FILE_NAMES[fmt]

    def existing(self, fmt: str) -> Path:
        path = self.path(fmt)
        if not path.is_file():
            present = sorted(p.name for p in self.root.glob("*.parquet")) if self.root.is_dir() else []
            raise DatasetFileMissing(
                f"{self.root}: no {path.name} (found {present or 'no Parquet files'}; "
                f"a request-format dataset needs requests/users/items.parquet, "
                f"an impression-format one impressions/items.parquet)"
            )
        return path

    @property
    def requests(self) -> Path:
        return self.existing("requests")

    @property
    def users(self) -> Path:
        return self.existing("users")

    @property
    def items(self) -> Path:
        return self.existing("items")

    @property
    def impressions(self) -> Path:
        return self.existing("impressions")

    @property
    def format(self) -> str:
        """``"requests"`` or ``"impressions"``, from the files present."""
        has_requests = self.path("requests").is_file()
        has_impressions = self.path("impressions").is_file()
        if has_requests and has_impressions:
            raise DataError(f"{self.root}: holds both requests.parquet and impressions.parquet; keep one format")
        if has_impressions:
            return "impressions"
        self.existing("requests")
        self.existing("users")
        return "requests"


def read_table(path: Path, fmt: str) -> pa.Table:
    """A whole (small) sterling file, validated and cast to its canonical schema."""
    pf = pq.ParquetFile(path)
    _, schema = validate_schema(pf.schema_arrow, fmt, str(path))
    return pf.read().cast(schema)


def open_writer(path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    """A zstd ParquetWriter: every sterling file is written through this."""
    return pq.ParquetWriter(path, schema, compression=COMPRESSION)


def write_table(table: pa.Table, path: Path, row_group_rows: int = 8192) -> Path:
    with open_writer(path, table.schema) as writer:
        writer.write_table(table, row_group_size=row_group_rows)
    return path


def _array(values: Any, t: pa.DataType | None) -> pa.Array:
    """``values`` (Arrow array or anything ``pa.array`` takes) as Arrow, cast to ``t`` when given."""
    array = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
    return array if t is None else array.cast(t)


def _types(columns: Mapping[str, Any]) -> dict[str, pa.DataType]:
    return {name: _array(values, None).type for name, values in columns.items()}


def list_array(offsets: np.ndarray, values: Any) -> pa.ListArray:
    """A canonical ListArray from int offsets [n + 1] and flat values (Arrow or array-like)."""
    values = _array(values, None)
    if isinstance(values, pa.ChunkedArray):  # pa.array splits a large numpy string array into chunks
        values = values.combine_chunks()
    return pa.ListArray.from_arrays(pa.array(np.asarray(offsets), pa.int32()), values, type=list_of(values.type))


def _table(schema: pa.Schema, columns: Mapping[str, Any]) -> pa.Table:
    return pa.Table.from_arrays([_array(columns[f.name], f.type) for f in schema], schema=schema)


def requests_table(
    roles: Roles, columns: Mapping[str, Any], impression_offsets: np.ndarray, impressions: Mapping[str, Any]
) -> pa.Table:
    """Build requests.parquet rows from flat arrays.

    Args:
        roles: the dataset roles.
        columns: request_id, user_id, ts and the context columns, each of length R.
        impression_offsets: int [R + 1]; request r's impressions are rows offsets[r]:offsets[r + 1].
        impressions: item_id, position, labels and impression features, each of length offsets[-1].
    """
    schema = requests_schema(roles, {**_types(columns), **_types(impressions)})
    struct_type = schema.field(IMPRESSIONS).type.value_type
    fields = pa.StructArray.from_arrays(
        [_array(impressions[f.name], f.type) for f in struct_type], fields=list(struct_type)
    )
    return _table(schema, {**columns, IMPRESSIONS: list_array(impression_offsets, fields)})


def users_table(
    roles: Roles, columns: Mapping[str, Any], timeline_offsets: np.ndarray, timeline: Mapping[str, Any]
) -> pa.Table:
    """Build users.parquet rows: ``columns`` holds user_id and the user features (length U);
    ``timeline`` holds item_id, action, ts (flat, sorted by (ts, item_id) within each user), user u's
    events being rows timeline_offsets[u]:timeline_offsets[u + 1]."""
    schema = users_schema(roles, _types(columns))
    lists = {
        name: list_array(timeline_offsets, _array(timeline[part], t))
        for name, part, t in zip(TIMELINE_COLUMNS, EVENT_PARTS, EVENT_TYPES)
    }
    return _table(schema, {**columns, **lists})


def items_table(roles: Roles, columns: Mapping[str, Any]) -> pa.Table:
    """Build items.parquet rows from item_id, attribute and display columns."""
    return _table(items_schema(roles, _types(columns)), columns)


def impressions_table(roles: Roles, columns: Mapping[str, Any]) -> pa.Table:
    """Build impressions.parquet rows from every column of the impression schema."""
    return _table(impressions_schema(roles, _types(columns)), columns)
