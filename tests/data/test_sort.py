"""The order check and the external sort (sterling.data.sort) against in-memory references."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.data.schema import DataError, write_table
from sterling.data.sort import first_unsorted, sort_parquet


def _table(rng, rows: int, distinct: int) -> pa.Table:
    """Two int keys with many ties, a float, and a list column (row i holds i, to check stability)."""
    lengths = rng.integers(0, 6, rows)
    return pa.table(
        {
            "a": rng.integers(0, distinct, rows),
            "b": rng.integers(-3, 3, rows).astype(np.int16),
            "x": rng.normal(size=rows).astype(np.float32),
            "row": pa.ListArray.from_arrays(
                np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32), np.repeat(np.arange(rows), lengths)
            ),
            "i": np.arange(rows),
        }
    )


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    rows=st.integers(1, 3000),
    distinct=st.integers(1, 400),
    memory=st.sampled_from([1, 2_000, 20_000, 1 << 30]),
    two_keys=st.booleans(),
)
def test_external_sort_is_the_stable_sort(tmp_path_factory, seed, rows, distinct, memory, two_keys):
    tmp = tmp_path_factory.mktemp("sort")
    table = _table(np.random.default_rng(seed), rows, distinct)
    keys = ("a", "b") if two_keys else ("a",)
    src = write_table(table, tmp / "src.parquet", row_group_rows=257)
    out = sort_parquet(src, tmp / "out.parquet", keys, memory_bytes=memory, batch_rows=300)
    got = pq.read_table(out)
    expected = table.take(np.lexsort([table.column(k).to_numpy() for k in reversed(keys)]))  # numpy's lexsort is stable
    assert got.schema.equals(table.schema) and got.equals(expected)
    assert first_unsorted(out, (*keys, "i")) is None
    assert sorted(p.name for p in tmp.iterdir()) == ["out.parquet", "src.parquet"]


def _first_unsorted_reference(table: pa.Table, keys) -> int | None:
    rows = list(zip(*(table.column(k).to_pylist() for k in keys)))
    return next((i for i in range(1, len(rows)) if rows[i] < rows[i - 1]), None)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    rows=st.integers(0, 600),
    distinct=st.integers(1, 5),
    batch=st.integers(1, 50),
    presorted=st.booleans(),
)
def test_first_unsorted_matches_a_row_by_row_scan(tmp_path_factory, seed, rows, distinct, batch, presorted):
    table = _table(np.random.default_rng(seed), rows, distinct)
    if presorted and rows:
        table = table.sort_by([("a", "ascending"), ("b", "ascending")])
        table = table.take(np.r_[0 : rows // 2, rows - 1, rows // 2 : rows - 1]) if rows > 3 and seed % 2 else table
    path = write_table(table, tmp_path_factory.mktemp("check") / "t.parquet", row_group_rows=97)
    assert first_unsorted(path, ("a", "b"), batch_rows=batch) == _first_unsorted_reference(table, ("a", "b"))


def test_bad_calls(tmp_path):
    table = pa.table({"a": pa.array([2, None, 1], pa.int64()), "b": [1, 2, 3]})
    src = write_table(table, tmp_path / "t.parquet")
    with pytest.raises(DataError, match="column 'a' has 1 null values; sort keys cannot be null"):
        first_unsorted(src, ("a",))
    with pytest.raises(DataError, match="column 'a' has 1 null values"):
        sort_parquet(src, tmp_path / "o.parquet", ("a",), memory_bytes=1)
    nulls_later = write_table(
        pa.table({"a": [1, 2, 3], "b": pa.array([1, None, 3], pa.int64())}), tmp_path / "n.parquet"
    )
    with pytest.raises(DataError, match="column 'b' has 1 null values"):
        sort_parquet(nulls_later, tmp_path / "o.parquet", ("a", "b"), memory_bytes=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.parquet", "t.parquet"]  # nothing half-written
    with pytest.raises(DataError, match="no column 'c' to sort by"):
        sort_parquet(src, tmp_path / "o.parquet", ("c",))
    with pytest.raises(ValueError, match="must differ from the source"):
        sort_parquet(src, src, ("b",))
    with pytest.raises(ValueError, match="at least one key"):
        sort_parquet(src, tmp_path / "o.parquet", ())


def test_the_budget_counts_repeated_lists_at_their_size_in_memory(tmp_path):
    """Dictionary encoding makes repeated lists small on disk; the buckets are sized for memory."""
    from sterling.data.sort import _memory_size

    rows = 4000
    history = pa.array([list(range(200))] * rows, pa.list_(pa.int64()))  # one list, repeated
    src = write_table(pa.table({"a": np.arange(rows)[::-1].copy(), "h": history}), tmp_path / "t.parquet")
    pf = pq.ParquetFile(src)
    encoded = sum(pf.metadata.row_group(i).total_byte_size for i in range(pf.metadata.num_row_groups))
    in_memory = pq.read_table(src).nbytes
    assert encoded < in_memory / 3 and _memory_size(pf) >= in_memory
