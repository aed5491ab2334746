"""Roles metadata, schema builders and validation, DatasetPaths (sterling.data.schema)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sterling.data.schema import (
    DataError,
    DatasetFileMissing,
    DatasetPaths,
    Roles,
    SchemaError,
    impressions_schema,
    items_table,
    list_array,
    read_roles,
    read_table,
    requests_schema,
    requests_table,
    users_schema,
    validate_impressions,
    validate_requests,
    with_roles,
    write_table,
)

ROLES = Roles(
    format="requests",
    context=("surface",),
    user=("country",),
    labels=("click", "like"),
    impression_features=("score",),
    attributes=("genre", "year"),
    display=("title",),
)
TYPES = {"surface": pa.string(), "country": pa.string(), "score": pa.float32(), "genre": pa.list_(pa.string()),
         "year": pa.int32(), "title": pa.string()}  # fmt: skip


def _large(t: pa.DataType) -> pa.DataType:
    """``t`` as Polars writes it: large_list and large_string."""
    if pa.types.is_list(t):
        return pa.large_list(_large(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _large(f.type)) for f in t])
    return pa.large_string() if pa.types.is_string(t) else t


def _tiny_requests() -> pa.Table:
    columns = {"request_id": [1, 2], "user_id": [7, 7], "ts": [10, 20], "surface": ["home", "search"]}
    impressions = {
        "item_id": [3, 4, 5],
        "position": [0, 1, 0],
        "click": [1, 0, 0],
        "like": [1, 0, 0],
        "score": [0.5, 0.25, 1.0],
    }
    return requests_table(ROLES, columns, [0, 2, 3], impressions)


def test_roles_json_round_trip_and_metadata():
    schema = with_roles(pa.schema([("x", pa.int64())]).with_metadata({b"other": b"kept"}), ROLES)
    assert read_roles(schema) == ROLES
    assert schema.metadata[b"other"] == b"kept"
    assert Roles.from_json(ROLES.to_json()) == ROLES
    assert ROLES.as_format("users").format == "users"
    assert ROLES.row_columns == ("surface", "country", "click", "like", "score")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(format="rows"), "unknown format"),
        (dict(format="requests", version=2), "version"),
        (dict(format="requests", labels=tuple("abcdefghi")), "at most 8"),
        (dict(format="requests", context=("ts",)), "reserved"),
        (dict(format="requests", context=("a",), user=("a",)), "more than one role"),
    ],
)
def test_roles_rejects_bad_roles(kwargs, message):
    with pytest.raises(SchemaError, match=message):
        Roles(**kwargs)


def test_read_roles_errors():
    with pytest.raises(SchemaError, match="no b'sterling'"):
        read_roles(pa.schema([("x", pa.int64())]), "f.parquet")
    with pytest.raises(SchemaError, match="not JSON"):
        read_roles(pa.schema([("x", pa.int64())]).with_metadata({b"sterling": b"{"}))
    with pytest.raises(SchemaError, match="unknown keys"):
        Roles.from_json(b'{"format": "items", "colour": []}')
    with pytest.raises(SchemaError, match="'labels' must be a list of column names"):
        Roles.from_json(b'{"format": "items", "labels": "click"}')


def test_builders_follow_the_contract():
    r = requests_schema(ROLES, TYPES)
    assert r.names == ["request_id", "user_id", "ts", "surface", "impressions"]
    struct = r.field("impressions").type.value_type
    assert [f.name for f in struct] == ["item_id", "position", "click", "like", "score"]
    assert struct.field("position").type == pa.int16() and struct.field("click").type == pa.int8()
    u = users_schema(ROLES, TYPES)
    assert u.names == ["user_id", "country", "timeline_item_id", "timeline_action", "timeline_ts"]
    assert u.field("timeline_action").type.value_type == pa.int8()
    i = impressions_schema(ROLES, TYPES)
    assert i.names == ["request_id", "user_id", "ts", "surface", "country", "item_id", "position", "click",
                       "like", "score", "history_item_id", "history_action", "history_ts"]  # fmt: skip
    assert read_roles(i).format == "impressions" and read_roles(u).format == "users"
    with pytest.raises(SchemaError, match="unsupported type"):
        requests_schema(ROLES, {**TYPES, "surface": pa.list_(pa.int64())})
    with pytest.raises(SchemaError, match="no type given"):
        requests_schema(ROLES, {})


def test_requests_table_groups_impressions():
    table = _tiny_requests()
    assert table.column("impressions").to_pylist()[0] == [
        {"item_id": 3, "position": 0, "click": 1, "like": 1, "score": 0.5},
        {"item_id": 4, "position": 1, "click": 0, "like": 0, "score": 0.25},
    ]
    roles, canonical = validate_requests(table.schema)
    assert roles == ROLES and canonical.equals(table.schema, check_metadata=True)


def test_large_list_and_large_string_are_accepted(tmp_path):
    table = _tiny_requests()
    large = pa.schema([pa.field(f.name, _large(f.type)) for f in table.schema], metadata=table.schema.metadata)
    path = write_table(table.cast(large), tmp_path / "requests.parquet")
    assert pq.read_schema(path).field("impressions").type == large.field("impressions").type
    back = read_table(path, "requests")
    assert back.equals(table) and back.schema.equals(table.schema, check_metadata=True)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.remove(s.get_field_index("surface")), "missing context column 'surface'"),
        (lambda s: s.append(pa.field("extra", pa.int64())), "not named by any role"),
        (lambda s: s.set(2, pa.field("ts", pa.int32())), "column 'ts' has type int32"),
        (lambda s: s.set(3, pa.field("surface", pa.list_(pa.string()))), "context column 'surface'"),
    ],
)
def test_validate_names_the_bad_column(change, message):
    schema = change(_tiny_requests().schema)
    with pytest.raises(SchemaError, match=message):
        validate_requests(schema, "requests.parquet")


def test_validate_rejects_another_format():
    with pytest.raises(SchemaError, match="format 'requests', expected 'impressions'"):
        validate_impressions(_tiny_requests().schema)


def test_label_must_be_int8():
    schema = _tiny_requests().schema
    struct = schema.field("impressions").type.value_type
    fields = [pa.field(f.name, pa.int32() if f.name == "click" else f.type) for f in struct]
    bad = schema.set(4, pa.field("impressions", pa.list_(pa.struct(fields))))
    with pytest.raises(SchemaError, match="'impressions'"):
        validate_requests(bad)


def test_dataset_paths(tmp_path):
    paths = DatasetPaths(tmp_path)
    with pytest.raises(DatasetFileMissing, match="no requests.parquet"):
        _ = paths.format
    with pytest.raises(DatasetFileMissing, match="no items.parquet"):
        _ = paths.items
    write_table(
        items_table(ROLES, {"item_id": [1], "genre": [["a"]], "year": [2000], "title": ["t"]}), paths.path("items")
    )
    write_table(_tiny_requests(), paths.path("requests"))
    with pytest.raises(DatasetFileMissing, match="no users.parquet.*requests.parquet"):
        _ = paths.format
    paths.path("users").touch()
    assert paths.format == "requests" and paths.items == tmp_path / "items.parquet"
    paths.path("impressions").touch()
    with pytest.raises(DataError, match="both"):
        _ = paths.format


def test_list_array_takes_values_arrow_splits_into_chunks():
    values = np.array(["music-live", "gaming-daily"])[np.arange(3_000_000) % 2]  # pa.array gives 2 chunks
    offsets = np.arange(0, 3_000_001, 3)
    out = list_array(offsets, values)
    assert len(out) == 1_000_000 and out[0].as_py() == ["music-live", "gaming-daily", "music-live"]
    assert out[-1].as_py() == ["gaming-daily", "music-live", "gaming-daily"]
