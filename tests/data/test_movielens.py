"""MovieLens loaders (sterling.data.movielens): hand-written fixtures, and the real files when present."""

import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sterling.data.group import join_users
from sterling.data.items import read_items
from sterling.data.movielens import MovieLensFormatError, detect_layout, load_movielens
from sterling.data.schema import read_roles

DATA = Path("/work/shared/data")
GENRE_FLAGS = ["0"] * 19


def _flags(*indices: int) -> str:
    flags = list(GENRE_FLAGS)
    for i in indices:
        flags[i] = "1"
    return "|".join(flags)


def _write_100k(root: Path) -> Path:
    root.mkdir()
    # user 1 rates at 1000, 1000, 1500 (window 600: one request) then 2000 (a second request).
    (root / "u.data").write_text("1\t2\t5\t1000\n1\t1\t3\t1000\n2\t1\t4\t50\n1\t3\t4\t2000\n1\t2\t2\t1500\n")
    (root / "u.item").write_bytes(
        (f"1|Misérables, Les (1995)|01-Jan-1995||http://x|{_flags(8, 17)}\n"
         f"2|Toy Story (1995)|01-Jan-1995||http://y|{_flags(3, 4, 5)}\n"
         f"3|unknown|||http://z|{_flags(0)}\n").encode("latin-1")
    )  # fmt: skip
    (root / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    return root


def _write_1m(root: Path) -> Path:
    root.mkdir()
    with gzip.open(root / "ratings.dat.gz", "wt") as f:
        f.write("1::10::4::978300760\n1::20::5::978300760\n2::10::1::978300000\n")
    (root / "movies.dat").write_bytes("10::Amélie (2001)::Comedy|Romance\n20::Heat (1995)::Action\n".encode("latin-1"))
    (root / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n")
    return root


def _write_latest(root: Path) -> Path:
    root.mkdir()
    (root / "ratings.csv").write_bytes(
        b"userId,movieId,rating,timestamp\r\n1,7,4.5,100\r\n1,9,3.5,100\r\n2,9,5.0,7\r\n"
    )
    (root / "movies.csv").write_bytes(
        b'movieId,title,genres\r\n7,"American President, The (1995)",Comedy|Drama|Romance\r\n'
        b"9,Babylon 5,(no genres listed)\r\n11,Heat (1995),Action\r\n"
    )
    return root


def test_100k_fixture(tmp_path):
    out = load_movielens(_write_100k(tmp_path / "ml"), tmp_path / "out")
    requests = pq.read_table(out / "requests.parquet").to_pylist()
    assert [(r["user_id"], r["ts"]) for r in requests] == [(1, 1000), (1, 2000), (2, 50)]
    assert [i["item_id"] for i in requests[0]["impressions"]] == [1, 2, 2]
    assert requests[0]["impressions"][1] == {"item_id": 2, "position": 1, "like": 1, "love": 1, "rating": 5}
    assert requests[0]["hour"] == 0
    users = pq.read_table(out / "users.parquet").to_pylist()
    assert users[0] == {"user_id": 1, "age": 24, "gender": "M", "occupation": "technician",
                        "timeline_item_id": [1, 2, 2, 3], "timeline_action": [0, 3, 0, 1], "timeline_ts": [1000, 1000, 1500, 2000]}  # fmt: skip
    ids, attributes, display = read_items(out)
    assert ids.tolist() == [1, 2, 3]
    assert attributes[0] == {"genre": ["Drama", "War"], "year": 1995}
    assert attributes[2] == {"genre": ["unknown"]}  # no release date: no year
    assert display["title"][0] == "Misérables, Les (1995)"
    assert [b.history_length.tolist() for b in join_users(out)] == [[0, 3, 0]]


def test_1m_fixture(tmp_path):
    out = load_movielens(_write_1m(tmp_path / "ml"), tmp_path / "out", window_s=60)
    users = pq.read_table(out / "users.parquet")
    assert users.column("user_id").to_pylist() == [1, 2]  # only users with ratings
    assert users.schema.field("occupation").type == pa.int8() and users.column("age").to_pylist() == [1, 56]
    _, attributes, display = read_items(out)
    assert attributes == [{"genre": ["Comedy", "Romance"], "year": 2001}, {"genre": ["Action"], "year": 1995}]
    assert display["title"][0] == "Amélie (2001)"
    assert read_roles(users.schema).user == ("gender", "age", "occupation")


def test_latest_fixture(tmp_path):
    out = load_movielens(_write_latest(tmp_path / "ml"), tmp_path / "out")
    requests = pq.read_table(out / "requests.parquet")
    impressions = requests.column("impressions").to_pylist()
    assert impressions[0] == [
        {"item_id": 7, "position": 0, "like": 1, "love": 0, "rating": 4.5},
        {"item_id": 9, "position": 1, "like": 0, "love": 0, "rating": 3.5},
    ]
    assert pq.read_schema(out / "users.parquet").names == [
        "user_id",
        "timeline_item_id",
        "timeline_action",
        "timeline_ts",
    ]
    _, attributes, display = read_items(out)
    assert attributes == [
        {"genre": ["Comedy", "Drama", "Romance"], "year": 1995},
        {"genre": []},
        {"genre": ["Action"], "year": 1995},
    ]
    assert display["title"][0] == "American President, The (1995)"


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no MovieLens ratings file"):
        detect_layout(tmp_path)
    root = _write_100k(tmp_path / "bad")
    good_users = (root / "u.user").read_text()
    (root / "u.user").write_text("1|24|M|technician\n")
    with pytest.raises(MovieLensFormatError, match="u.user line 1: 4 fields, expected 5"):
        load_movielens(root, tmp_path / "out")
    (root / "u.user").write_text(good_users)
    (root / "u.data").write_text("1\t99\t5\t1000\n")
    with pytest.raises(MovieLensFormatError, match="item 99"):
        load_movielens(root, tmp_path / "out")
    (root / "u.data").write_text("1\t2\tfive\t1000\n")
    with pytest.raises(MovieLensFormatError, match="not an integer"):
        load_movielens(root, tmp_path / "out")
    with pytest.raises(ValueError, match="window_s"):
        load_movielens(root, tmp_path / "out", window_s=0)


REAL = [
    ("ml-100k", 100_000, 943, 1_682),
    ("ml-1m-subset", 487_650, 2_999, 3_883),
    ("ml-latest-small", 100_836, 610, 9_742),
]


@pytest.mark.parametrize("name, ratings, users, items", REAL)
def test_real_data_counts(tmp_path, name, ratings, users, items):
    if not (DATA / name).is_dir():
        pytest.skip(f"{DATA / name} not present")
    out = load_movielens(DATA / name, tmp_path / name)
    requests = pq.read_table(out / "requests.parquet")
    lengths = np.array([len(x) for x in requests.column("impressions").to_pylist()])
    assert lengths.sum() == ratings
    assert pq.read_metadata(out / "users.parquet").num_rows == users
    assert pq.read_metadata(out / "items.parquet").num_rows == items
    timeline = pq.read_table(out / "users.parquet", columns=["timeline_ts"]).column("timeline_ts")
    assert sum(len(x) for x in timeline.to_pylist()) == ratings
    assert sum(len(b.requests) for b in join_users(out)) == requests.num_rows


def test_window_one_second_gives_same_second_groups(tmp_path):
    if not (DATA / "ml-100k").is_dir():
        pytest.skip("ml-100k not present")
    out = load_movielens(DATA / "ml-100k", tmp_path / "out", window_s=1)
    assert pq.read_metadata(out / "requests.parquet").num_rows == 49_439  # the data README's count
