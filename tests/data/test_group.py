"""Lossless streaming conversion and its validation (sterling.data.group)."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sterling.data.group import impressions_to_requests, join_users, requests_to_impressions
from sterling.data.movielens import load_movielens
from sterling.data.schema import (
    DataError,
    DatasetPaths,
    Roles,
    impressions_table,
    items_table,
    requests_table,
    users_table,
    write_table,
)
from sterling.data.synth import SynthConfig, generate

ML100K = Path("/work/shared/data/ml-100k")
ROLES = Roles(format="impressions", context=("surface",), user=("country",), labels=("click",),
              impression_features=("score",), attributes=("genre",))  # fmt: skip


def _read(path: Path) -> pa.Table:
    return pq.read_table(path)


def _assert_identical(a: Path, b: Path) -> None:
    left, right = _read(a), _read(b)
    assert left.schema.equals(right.schema, check_metadata=True)
    assert left.equals(right)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    config = SynthConfig(num_users=40, num_items=300, requests_per_user=(0, 8), history_length=(0, 40), seed=11)
    return generate(config, tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def impressions(synth, tmp_path_factory) -> Path:
    return requests_to_impressions(synth, tmp_path_factory.mktemp("impressions"))


def test_round_trip_is_exact(synth, impressions, tmp_path):
    requests = impressions_to_requests(impressions, tmp_path / "requests")
    again = requests_to_impressions(requests, tmp_path / "again")
    _assert_identical(impressions / "impressions.parquet", again / "impressions.parquet")
    _assert_identical(synth / "requests.parquet", requests / "requests.parquet")
    assert (requests / "items.parquet").read_bytes() == (synth / "items.parquet").read_bytes()
    assert DatasetPaths(again).format == "impressions" and DatasetPaths(requests).format == "requests"


def test_small_batches_cross_boundaries(synth, impressions, tmp_path):
    small = requests_to_impressions(synth, tmp_path / "small", batch_rows=3)
    _assert_identical(impressions / "impressions.parquet", small / "impressions.parquet")
    grouped = impressions_to_requests(impressions, tmp_path / "grouped", batch_rows=7)
    one_row = impressions_to_requests(impressions, tmp_path / "one_row", batch_rows=1)
    reference = impressions_to_requests(impressions, tmp_path / "reference")
    for name in ("requests.parquet", "users.parquet"):
        _assert_identical(reference / name, grouped / name)
        _assert_identical(reference / name, one_row / name)
    assert pq.ParquetFile(small / "impressions.parquet").num_row_groups > 1


def test_impression_rows_follow_the_contract(synth, impressions):
    table = _read(impressions / "impressions.parquet")
    requests = _read(synth / "requests.parquet")
    assert table.num_rows == sum(len(x) for x in requests.column("impressions").to_pylist())
    keys = np.stack([table.column(n).to_numpy() for n in ("user_id", "ts", "request_id")])
    assert (np.diff(keys[0]) >= 0).all()
    rows = table.slice(0, 50).to_pylist()
    users = {r["user_id"]: r for r in _read(synth / "users.parquet").to_pylist()}
    for row in rows:
        timeline = users[row["user_id"]]
        before = [i for i, t in enumerate(timeline["timeline_ts"]) if t < row["ts"]]
        assert row["history_ts"] == [timeline["timeline_ts"][i] for i in before]
        assert row["history_item_id"] == [timeline["timeline_item_id"][i] for i in before]
        assert row["country"] == timeline["country"]


def test_join_users_history_lengths(synth):
    users = {r["user_id"]: r["timeline_ts"] for r in _read(synth / "users.parquet").to_pylist()}
    for batch in join_users(synth, batch_rows=5):
        for user, ts, length in zip(
            batch.requests.column("user_id").to_pylist(), batch.requests.column("ts").to_pylist(), batch.history_length
        ):
            assert length == sum(t < ts for t in users[user])


@pytest.mark.skipif(not ML100K.is_dir(), reason="ML-100K not present")
def test_round_trip_movielens_100k(tmp_path):
    data = load_movielens(ML100K, tmp_path / "ml")
    impressions = requests_to_impressions(data, tmp_path / "imp")
    requests = impressions_to_requests(impressions, tmp_path / "req", batch_rows=10_000)
    again = requests_to_impressions(requests, tmp_path / "again", batch_rows=500)
    _assert_identical(impressions / "impressions.parquet", again / "impressions.parquet")
    _assert_identical(data / "requests.parquet", requests / "requests.parquet")
    assert pq.ParquetFile(impressions / "impressions.parquet").metadata.num_rows == 100_000


# A hand-made impression table: user 1 has requests 10 (ts 100) and 11 (ts 200), user 2 request 12.
BASE = [
    # request_id, user_id, ts, surface, country, item_id, position, click, score, history [(item, action, ts)]
    (10, 1, 100, "home", "US", 5, 0, 1, 0.5, [(3, 1, 40)]),
    (10, 1, 100, "home", "US", 6, 1, 0, 0.1, [(3, 1, 40)]),
    (11, 1, 200, "search", "US", 7, 0, 0, 0.2, [(3, 1, 40), (5, 1, 120)]),
    (11, 1, 200, "search", "US", 8, 1, 1, 0.3, [(3, 1, 40), (5, 1, 120)]),
    (12, 2, 100, "home", "FR", 9, 0, 0, 0.9, []),
]


def _write_impressions(root: Path, rows) -> Path:
    columns = {n: [r[i] for r in rows] for i, n in enumerate(
        ("request_id", "user_id", "ts", "surface", "country", "item_id", "position", "click", "score"))}  # fmt: skip
    for j, name in enumerate(("history_item_id", "history_action", "history_ts")):
        columns[name] = [[event[j] for event in r[9]] for r in rows]
    columns["click"] = pa.array(columns["click"], pa.int8())
    columns["score"] = pa.array(columns["score"], pa.float32())
    root.mkdir(parents=True, exist_ok=True)
    write_table(impressions_table(ROLES, columns), root / "impressions.parquet")
    write_table(items_table(ROLES, {"item_id": [5, 6], "genre": [["a"], []]}), root / "items.parquet")
    return root


def _edit(index: int, **changes):
    names = ("request_id", "user_id", "ts", "surface", "country", "item_id", "position", "click", "score", "history")
    rows = [list(r) for r in BASE]
    for name, value in changes.items():
        rows[index][names.index(name)] = value
    return rows


def test_hand_made_rows_group_as_expected(tmp_path):
    src = _write_impressions(tmp_path / "src", BASE)
    out = impressions_to_requests(src, tmp_path / "out")
    requests = _read(out / "requests.parquet").to_pylist()
    assert [r["request_id"] for r in requests] == [10, 11, 12]
    assert [i["item_id"] for i in requests[1]["impressions"]] == [7, 8]
    users = _read(out / "users.parquet").to_pylist()
    assert users[0] == {
        "user_id": 1,
        "country": "US",
        "timeline_item_id": [3, 5],
        "timeline_action": [1, 1],
        "timeline_ts": [40, 120],
    }
    assert users[1]["timeline_item_id"] == []
    _assert_identical(
        src / "impressions.parquet", requests_to_impressions(out, tmp_path / "back") / "impressions.parquet"
    )


@pytest.mark.parametrize(
    "order",
    [
        [0, 4, 1, 2, 3],  # users interleaved
        [0, 2, 1, 3, 4],  # a user's requests out of time order
        [4, 3, 2, 1, 0],  # reversed: positions out of order too
        [2, 4, 0, 3, 1],
    ],
)
def test_rows_in_any_order_group_alike(tmp_path, order):
    reference = impressions_to_requests(_write_impressions(tmp_path / "src", BASE), tmp_path / "out")
    shuffled = _write_impressions(tmp_path / "shuffled", [BASE[i] for i in order])
    out = impressions_to_requests(shuffled, tmp_path / "shuffled-out")
    for name in ("requests.parquet", "users.parquet"):
        _assert_identical(reference / name, out / name)
    assert sorted(p.name for p in out.iterdir()) == ["items.parquet", "requests.parquet", "users.parquet"]


def test_a_log_in_time_order_round_trips(synth, impressions, tmp_path):
    log = requests_to_impressions(synth, tmp_path / "log", batch_rows=5, order="time")
    table = _read(log / "impressions.parquet")
    expected = _read(impressions / "impressions.parquet").sort_by([("ts", "ascending"), ("user_id", "ascending")])
    assert table.equals(expected)  # the same rows, in (ts, user_id) order; a request's rows stay in position order
    assert (np.diff(table.column("user_id").to_numpy()) < 0).any()
    grouped = impressions_to_requests(log, tmp_path / "grouped", batch_rows=7)
    reference = impressions_to_requests(impressions, tmp_path / "reference")
    _assert_identical(synth / "requests.parquet", grouped / "requests.parquet")
    _assert_identical(reference / "users.parquet", grouped / "users.parquet")


def test_unknown_order(synth, tmp_path):
    with pytest.raises(ValueError, match="order must be one of \\['time', 'user'\\], not 'random'"):
        requests_to_impressions(synth, tmp_path / "x", order="random")


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            _edit(1, ts=250),
            "request 10 of user 1 has rows at ts 100 and ts 250; column 'ts' must be constant per request",
        ),
        (
            _edit(1, surface="search"),
            "request 10 of user 1: column 'surface' is 'search' at row 1 but 'home' at row 0; it must be constant per request",
        ),
        (_edit(1, ts=101), "request 10 of user 1: column 'ts' is 101"),
        (
            _edit(2, country="DE"),
            "user 1: column 'country' is 'DE' at row 2 but 'US' at row 0; it must be constant per user",
        ),
        (_edit(1, history=[(4, 1, 40)]), "row 1: request 10 of user 1 has a different history than its row 0"),
        (
            _edit(0, history=[(3, 1, 40), (4, 1, 100)])[:1]
            + _edit(1, history=[(3, 1, 40), (4, 1, 100)])[1:2]
            + BASE[2:],
            "leakage",
        ),
        (
            [BASE[0], BASE[1], *(tuple(_edit(i, history=[(5, 1, 120), (3, 1, 40)])[i]) for i in (2, 3)), BASE[4]],
            "not sorted by \\(ts, item_id\\)",
        ),
        (
            [*(tuple(_edit(i, history=[(4, 1, 40)])[i]) for i in (0, 1)), *BASE[2:]],
            "the history of request 10 \\(ts 100\\) is not the part before ts 100 of the next request 11",
        ),
        (
            [*(tuple(_edit(i, history=[])[i]) for i in (0, 1)), *BASE[2:]],
            "the history of request 10 .* is not the part before",
        ),
        (
            [*BASE[:2], *(tuple(_edit(i, history=[])[i]) for i in (2, 3)), BASE[4]],
            "request 11 has a shorter history than the earlier request 10",
        ),
        (_edit(3, click=2), "row 3: label 'click' is 2; labels are 0/1"),
        (_edit(4, user_id=None), "column 'user_id' has 1 null values"),
    ],
)
def test_impressions_to_requests_rejects(tmp_path, rows, message):
    src = _write_impressions(tmp_path / "src", rows)
    with pytest.raises(DataError, match=message):
        impressions_to_requests(src, tmp_path / "out")


def _request_dataset(root: Path, request_rows, user_rows) -> Path:
    roles = ROLES.as_format("requests")
    columns = {n: [r[i] for r in request_rows] for i, n in enumerate(("request_id", "user_id", "ts", "surface"))}
    lists = [r[4] for r in request_rows]
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in lists])])
    flat = [pair for x in lists for pair in x]  # (item_id, click)
    impressions = {"item_id": [p[0] for p in flat], "position": [0] * len(flat), "click": pa.array([p[1] for p in flat], pa.int8()),
                   "score": pa.array([0.0] * len(flat), pa.float32())}  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    write_table(requests_table(roles, columns, offsets, impressions), root / "requests.parquet")
    events = [e for u in user_rows for e in u[2]]
    timeline = {"item_id": [e[0] for e in events], "action": [e[1] for e in events], "ts": [e[2] for e in events]}
    timeline_offsets = np.concatenate([[0], np.cumsum([len(u[2]) for u in user_rows])])
    users = {"user_id": [u[0] for u in user_rows], "country": [u[1] for u in user_rows]}
    write_table(users_table(roles, users, timeline_offsets, timeline), root / "users.parquet")
    write_table(items_table(roles, {"item_id": [5], "genre": [["a"]]}), root / "items.parquet")
    return root


GOOD_USERS = [(1, "US", [(3, 1, 40), (5, 1, 120)]), (2, "FR", [])]


@pytest.mark.parametrize(
    "requests, users, message",
    [
        (
            [(10, 1, 100, "home", [(5, 0)]), (11, 3, 100, "home", [(6, 0)])],
            GOOD_USERS,
            "request 11 has user 3, who has no row in",
        ),
        ([(10, 1, 100, "home", [(5, 0)]), (11, 1, 50, "home", [(6, 0)])], GOOD_USERS, "ts decreases for user 1"),
        ([(10, 2, 100, "home", [(5, 0)]), (11, 1, 50, "home", [(6, 0)])], GOOD_USERS, "user 1 follows user 2"),
        ([(10, 1, 100, "home", [])], GOOD_USERS, "request 10 has no impressions"),
        (
            [(10, 1, 100, "home", [(5, 3), (6, 0)])],
            GOOD_USERS,
            "request 10, impression 0: label 'click' is 3; labels are 0/1",
        ),
        ([(10, 1, 100, "home", [(5, 0)])], [(1, "US", [(5, 1, 120), (3, 1, 40)])], "timeline of user 1 is not sorted"),
        (
            [(10, 1, 100, "home", [(5, 0)])],
            [GOOD_USERS[1], GOOD_USERS[0]],
            "user 1 after user 2; users must be unique and sorted",
        ),
    ],
)
def test_requests_to_impressions_rejects(tmp_path, requests, users, message):
    src = _request_dataset(tmp_path / "src", requests, users)
    with pytest.raises(DataError, match=message):
        requests_to_impressions(src, tmp_path / "out")


def test_output_must_differ_from_source(synth):
    with pytest.raises(ValueError, match="must differ"):
        requests_to_impressions(synth, synth)
