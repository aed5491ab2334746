"""Impression logs → request rows with Ray Data, over Parquet files larger than memory (``[ray]``
extra).

The single-process converter (:func:`sterling.data.group.impressions_to_requests`) sorts a log to
user order on one machine; here Ray Data does the shuffle::

    read_parquet(files, any order)                 impression rows, in blocks across the cluster
      → groupby(user_id).map_groups(one user)      sort the user's rows to (ts, request_id, position),
                                                   validate and group them (the same RequestGrouper), and
                                                   return one row: the user row + its request rows
      → sort(user_id) → iter_batches               streamed by the driver into requests.parquet and
                                                   users.parquet, one batch of users at a time

Memory: a worker holds one user's rows, the driver one batch of users; Ray's object store spills
the shuffle to disk. The output equals the single-process converter's on the same rows
(``tests/data/test_ray_group.py``), and a validation error is the same :class:`DataError`.

Example::

    import ray
    ray.init(num_cpus=2)
    ray_impressions_to_requests("logs/", "runs/items.parquet", "runs/requests")
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sterling.data.group import IMPRESSION_ORDERS, RequestGrouper
from sterling.data.schema import (
    DataError,
    DatasetPaths,
    Roles,
    column_types,
    open_writer,
    requests_schema,
    users_schema,
    validate_impressions,
    validate_items,
)

__all__ = ["ray_impressions_to_requests"]

_REQUESTS, _USER = "__requests", "__user"


def _parquet_files(src: Path) -> list[Path]:
    files = sorted(src.rglob("*.parquet")) if src.is_dir() else [src]
    if not files or not all(f.is_file() for f in files):
        raise DataError(f"{src}: no Parquet files of impression rows")
    return files


def _nested(table: pa.Table) -> pa.StructArray:
    return table.to_struct_array().combine_chunks()


def _group_user(rows: pa.Table, roles: Roles, schema: pa.Schema, where: str) -> pa.Table:
    """One user's impression rows → one row: ``user_id``, the user row and the request rows (nested)."""
    rows = rows.select(schema.names).cast(schema).sort_by([(k, "ascending") for k in IMPRESSION_ORDERS["user"]])
    user = rows.column("user_id")[0].as_py()
    requests, users = RequestGrouper(roles, f"{where} (user {user})").group(rows.combine_chunks())
    nested = pa.ListArray.from_arrays(pa.array([0, requests.num_rows], pa.int32()), _nested(requests))
    return pa.table({"user_id": pa.array([user], pa.int64()), _USER: _nested(users), _REQUESTS: nested})


def ray_impressions_to_requests(
    src: str | Path, items: str | Path, out_dir: str | Path, batch_users: int = 1024
) -> Path:
    """Write the request-format dataset of the impression rows in ``src`` (a Parquet file or a
    directory of them, rows in any order) with ``items`` (items.parquet) to ``out_dir``; returns it.

    Uses the running Ray cluster (``ray.init`` first to choose one; Ray Data starts a local one
    otherwise). Validation is :func:`sterling.data.group.impressions_to_requests`'s, per user;
    its errors are raised here as :class:`DataError` naming the file set and the user.
    """
    import ray
    import ray.data

    src, items, out = Path(src), Path(items), DatasetPaths(out_dir)
    files = _parquet_files(src)
    roles, schema = validate_impressions(pq.read_schema(files[0]), str(files[0]))
    for f in files[1:]:
        if not pq.read_schema(f).equals(pq.read_schema(files[0])):
            raise DataError(f"{f}: its schema differs from {files[0]}'s; all impression files need one schema")
    validate_items(pq.read_schema(items), str(items))
    out.root.mkdir(parents=True, exist_ok=True)
    types = column_types(schema)
    request_schema, user_schema = requests_schema(roles, types), users_schema(roles, types)
    grouped = (
        ray.data.read_parquet([str(f) for f in files])
        .groupby("user_id")
        .map_groups(_group_user, batch_format="pyarrow", fn_args=(roles, schema, str(src)))
        .sort("user_id")
    )
    try:
        with (
            open_writer(out.path("requests"), request_schema) as request_writer,
            open_writer(out.path("users"), user_schema) as user_writer,
        ):
            for batch in grouped.iter_batches(batch_size=batch_users, batch_format="pyarrow"):
                requests = pc.list_flatten(batch.column(_REQUESTS).combine_chunks())
                request_writer.write_table(pa.Table.from_struct_array(requests).cast(request_schema))
                user_writer.write_table(
                    pa.Table.from_struct_array(batch.column(_USER).combine_chunks()).cast(user_schema)
                )
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, DataError):
            raise DataError(str(error.cause)) from None
        raise
    shutil.copyfile(items, out.path("items"))
    return out.root
