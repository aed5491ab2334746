"""Sorting Parquet files larger than memory: an order check and a stable external sort.

An impression log is written in the order impressions are served (time order, the requests of all
users interleaved); grouping it into request rows needs the order (user_id, ts, request_id,
position). ``sort_parquet`` produces any such order in bounded memory:

1. a pass over the first key column picks bucket boundaries (quantiles of a strided sample), as
   many buckets as the file's uncompressed size needs to keep each under ``memory_bytes``;
2. a pass over the rows appends each row to its bucket's temporary Parquet file (in file order);
3. each bucket, read whole, is sorted by all keys (Arrow's sort is stable) and appended to ``dst``.

Rows with equal keys keep their file order, and all rows with one value of the first key land in
one bucket, so the output is the stable sort of the input. A bucket holds more than the budget only
when a single value of the first key does.

Example::

    from sterling.data.sort import first_unsorted, sort_parquet
    if first_unsorted("log.parquet", ("user_id", "ts")) is not None:
        sort_parquet("log.parquet", "sorted.parquet", ("user_id", "ts"))
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sterling.data.schema import DataError, open_writer

__all__ = ["first_unsorted", "sort_parquet"]

MEMORY_BYTES = 256 << 20
SCAN_ROWS = 65_536
SAMPLE_SIZE = 65_536


def _key_arrays(table: pa.Table | pa.RecordBatch, keys: Sequence[str], where: str) -> list[np.ndarray]:
    arrays = []
    for name in keys:
        column = table.column(name)
        if column.null_count:
            raise DataError(f"{where}: column {name!r} has {column.null_count} null values; sort keys cannot be null")
        arrays.append(column.to_numpy(zero_copy_only=False))
    return arrays


def _later_is_smaller(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """bool [n]: rows of ``b`` lexicographically smaller than the rows of ``a`` (key by key)."""
    smaller, equal = np.zeros(len(a[0]), bool), np.ones(len(a[0]), bool)
    for x, y in zip(a, b):
        smaller |= equal & (y < x)
        equal &= y == x
    return smaller


def first_unsorted(path: str | Path, keys: Sequence[str], batch_rows: int = SCAN_ROWS) -> int | None:
    """The first row of the Parquet file ``path`` that sorts before the row above it by ``keys``
    (ascending, lexicographic), or None when the file is in that order. Reads only the key columns."""
    where, previous, row0 = str(path), None, 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=list(keys)):
        arrays = _key_arrays(batch, keys, where)
        if previous is not None:
            arrays = [np.concatenate([[p], a]) for p, a in zip(previous, arrays)]
        bad = np.flatnonzero(_later_is_smaller([a[:-1] for a in arrays], [a[1:] for a in arrays]))
        if len(bad):
            return row0 + int(bad[0]) + (0 if previous is not None else 1)
        previous = [a[-1] for a in arrays]
        row0 += batch.num_rows
    return None


def _memory_size(pf: pq.ParquetFile) -> float:
    """Bytes the rows take in memory while a bucket is sorted: the metadata's sizes (after
    dictionary encoding, far below Arrow's for repeated lists) scaled by the first row group's
    Arrow size over its metadata size, doubled for the sorted copy."""
    meta = pf.metadata
    if not meta.num_row_groups:
        return 0.0
    encoded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    first = meta.row_group(0).total_byte_size
    return 2.0 * encoded * max(1.0, pf.read_row_group(0).nbytes / max(first, 1))


def _boundaries(pf: pq.ParquetFile, key: str, buckets: int, batch_rows: int, where: str) -> np.ndarray:
    """Sorted unique upper edges of ``buckets`` ranges of ``key``, from a strided sample of the column."""
    step = max(1, pf.metadata.num_rows // SAMPLE_SIZE)
    sample = np.concatenate(
        [_key_arrays(batch, [key], where)[0][::step] for batch in pf.iter_batches(batch_size=batch_rows, columns=[key])]
    )
    return np.unique(np.quantile(sample, np.arange(1, buckets) / buckets, method="lower"))


def sort_parquet(
    src: str | Path, dst: str | Path, keys: Sequence[str], memory_bytes: int = MEMORY_BYTES, batch_rows: int = SCAN_ROWS
) -> Path:
    """Write the rows of ``src`` to ``dst`` stably sorted by ``keys`` (ascending); returns ``dst``.

    Holds about ``memory_bytes`` at a time (one bucket and its sorted copy, sized from the first
    row group), plus ``batch_rows`` rows while splitting. Key columns must be non-null numbers. ``dst`` is written with the same
    schema and sterling's writer settings; ``src`` and ``dst`` must differ.
    """
    src, dst = Path(src), Path(dst)
    if not keys:
        raise ValueError("sort_parquet needs at least one key")
    if src.resolve() == dst.resolve():
        raise ValueError(f"{dst}: the sorted file must differ from the source")
    pf = pq.ParquetFile(src)
    schema = pf.schema_arrow
    missing = [k for k in keys if k not in schema.names]
    if missing:
        raise DataError(f"{src}: no column {missing[0]!r} to sort by")
    buckets = max(1, math.ceil(_memory_size(pf) / memory_bytes))
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".sort-") as tmp:
        sorted_path = Path(tmp) / "sorted.parquet"
        with open_writer(sorted_path, schema) as out:
            for bucket in _buckets(pf, keys, buckets, Path(tmp), batch_rows, str(src)):
                _key_arrays(bucket, keys, str(src))
                out.write_table(bucket.sort_by([(k, "ascending") for k in keys]))
        os.replace(sorted_path, dst)  # only a complete sort replaces dst
    return dst


def _buckets(
    pf: pq.ParquetFile, keys: Sequence[str], buckets: int, tmp: Path, batch_rows: int, where: str
) -> Iterator[pa.Table]:
    """The rows of ``pf`` in ``buckets`` tables by ranges of the first key, in key order, each in file order."""
    if buckets == 1:
        yield pf.read()
        return
    edges = _boundaries(pf, keys[0], buckets, batch_rows, where)
    paths = [tmp / f"{i}.parquet" for i in range(len(edges) + 1)]
    writers: dict[int, pq.ParquetWriter] = {}
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
            bucket = np.searchsorted(edges, _key_arrays(batch, keys[:1], where)[0], side="left")
            rows = np.argsort(bucket, kind="stable")
            starts = np.searchsorted(bucket[rows], np.arange(len(paths) + 1))
            for i in np.flatnonzero(np.diff(starts)):
                if i not in writers:
                    writers[i] = open_writer(paths[i], pf.schema_arrow)
                writers[i].write_batch(batch.take(pa.array(rows[starts[i] : starts[i + 1]])))
    finally:
        for writer in writers.values():
            writer.close()
    for i in sorted(writers):
        yield pq.read_table(paths[i])
