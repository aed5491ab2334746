"""Ray Data grouping of an impression log (sterling.data.ray_group) equals the single-process
converter's output on the same rows. Runs with the [ray] extra; ray.init(num_cpus=2) on 127.0.0.1."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sterling.data.group import impressions_to_requests, requests_to_impressions
from sterling.data.schema import DataError, write_table
from sterling.data.synth import SynthConfig, generate

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")
pytest.importorskip("ray.data", reason="the [ray] extra is not installed")

from sterling.data.ray_group import ray_impressions_to_requests  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    """An impression log in time order, split into 4 Parquet files, and the single-process grouping."""
    root = tmp_path_factory.mktemp("log")
    synth = generate(
        SynthConfig(num_users=50, num_items=300, requests_per_user=(1, 6), history_length=(0, 30), seed=8),
        root / "synth",
    )
    served = requests_to_impressions(synth, root / "served", order="time")
    table = pq.read_table(served / "impressions.parquet")
    parts = root / "parts"
    parts.mkdir()
    for i, chunk in enumerate(np.array_split(np.arange(table.num_rows), 4)):
        write_table(table.take(chunk), parts / f"part-{i}.parquet", row_group_rows=100)
    return parts, served / "items.parquet", impressions_to_requests(served, root / "single")


def test_ray_grouping_equals_the_single_process_converter(cluster, log, tmp_path):
    parts, items, single = log
    out = ray_impressions_to_requests(parts, items, tmp_path / "ray", batch_users=7)
    for name in ("requests.parquet", "users.parquet", "items.parquet"):
        a, b = pq.read_table(single / name), pq.read_table(out / name)
        assert a.schema.equals(b.schema) and a.equals(b), name


def test_ray_grouping_reports_bad_rows(cluster, log, tmp_path):
    parts, items, _ = log
    table = pq.read_table(parts / "part-1.parquet")
    click = table.column("click").to_numpy().copy()
    click[3] = 2
    bad = tmp_path / "bad"
    bad.mkdir()
    write_table(
        table.set_column(table.schema.get_field_index("click"), "click", pa.array(click, pa.int8())), bad / "p.parquet"
    )
    with pytest.raises(DataError, match="label 'click' is 2; labels are 0/1"):
        ray_impressions_to_requests(bad, items, tmp_path / "out")
    with pytest.raises(DataError, match="no Parquet files"):
        ray_impressions_to_requests(tmp_path / "empty-dir-that-does-not-exist", items, tmp_path / "out2")
