"""Interaction logs as request-format datasets (sterling.data.interactions): synthetic logs written here."""

from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from sterling import cli
from sterling.data.interactions import InteractionOptions, load_interactions
from sterling.data.items import read_items
from sterling.data.schema import DataError, read_roles, read_table
from sterling.train.retrieval import load_catalog_timelines
from sterling.train.sequence_split import leave_last_out

MAX_LEN = 4


def _random_log(seed: int = 0, events: int = 300) -> pa.Table:
    """String user and item ids, timestamps with ties, two 0/1 labels and a float feature."""
    rng = np.random.default_rng(seed)
    users = [f"u{k}" for k in rng.integers(0, 25, events)]
    items = [f"item-{k:03d}" for k in rng.integers(0, 60, events)]
    return pa.table(
        {
            "user_id": users,
            "item_id": items,
            "timestamp": rng.integers(0, 5000, events) // 10 * 10,  # ties: (ts, item) decides
            "buy": rng.integers(0, 2, events),
            "fav": rng.integers(0, 2, events).astype(bool),
            "price": rng.random(events).round(3),
            "ignored": ["x"] * events,
        }
    )


def _by_hand(log: pa.Table) -> dict[str, list[str]]:
    """Each user's items ordered by (ts, item), from the raw rows."""
    timelines = defaultdict(list)
    for row in log.to_pylist():
        timelines[row["user_id"]].append((row["timestamp"], row["item_id"]))
    return {user: [item for _, item in sorted(events)] for user, events in timelines.items()}


def test_round_trip_gives_the_hand_made_leave_last_out_split(tmp_path):
    log = _random_log()
    pacsv.write_csv(log, tmp_path / "log.csv")
    out = load_interactions(tmp_path / "log.csv", tmp_path / "out", InteractionOptions(label_cols=("buy",)))
    timelines, item_ids = load_catalog_timelines(out)
    ids = pq.read_table(out / "ids.parquet").to_pylist()
    user_source = {r["id"]: r["source_id"] for r in ids if r["kind"] == "user"}
    item_source = {r["id"]: r["source_id"] for r in ids if r["kind"] == "item"}
    split = leave_last_out(timelines.offsets, timelines.item_rows, timelines.ts, MAX_LEN)

    def named(sequences, row: int) -> tuple[str, list[str]]:
        lo, hi = sequences.offsets[row].item(), sequences.offsets[row + 1].item()
        user = user_source[int(timelines.user_ids[sequences.users[row]])]
        return user, [item_source[int(item_ids[r])] for r in sequences.items[lo:hi].tolist()]

    hand = _by_hand(log)
    train = dict(named(split.train, r) for r in range(len(split.train)))
    assert train == {u: s[:-2][-MAX_LEN:] if len(s) >= 3 else s[-MAX_LEN:] for u, s in hand.items() if len(s) >= 2}
    evaluated = {u: s for u, s in hand.items() if len(s) >= 3}
    for held_out, last in ((split.valid, -2), (split.test, -1)):
        got = {}
        for r in range(len(held_out)):
            user, history = named(held_out.history, r)
            got[user] = (history, item_source[int(item_ids[held_out.targets[r]])])
        expected = {u: (s[:last][-MAX_LEN:], s[last]) for u, s in evaluated.items()}
        assert got == expected
    assert len(evaluated) > 10 and any(len(s) > MAX_LEN + 2 for s in evaluated.values())  # the fixture bites


def test_timestamps_group_requests_by_window(tmp_path):
    log = pa.table({"user_id": [7, 7, 7, 7, 3], "item_id": [2, 1, 5, 4, 1], "timestamp": [100, 100, 159, 160, 9]})
    pq.write_table(log, tmp_path / "log.parquet")
    out = load_interactions(tmp_path / "log.parquet", tmp_path / "out", InteractionOptions(window_s=60))
    requests = pq.read_table(out / "requests.parquet").to_pylist()
    assert [(r["user_id"], r["ts"], [i["item_id"] for i in r["impressions"]]) for r in requests] == [
        (3, 9, [1]),
        (7, 100, [1, 2, 5]),  # 159 < 100 + 60; (ts, item) order within the request
        (7, 160, [4]),
    ]
    assert requests[1]["impressions"][2] == {"item_id": 5, "position": 2, "click": 1}
    assert not (out / "ids.parquet").exists()  # integer ids are kept


def test_text_log_without_timestamps_has_one_request_per_interaction(tmp_path):
    (tmp_path / "log.txt").write_text("5 30 10 20\n\n2 10\t40\n5 99\n")
    out = load_interactions(tmp_path / "log.txt", tmp_path / "out")
    requests = pq.read_table(out / "requests.parquet").to_pylist()
    assert len(requests) == 6  # one per interaction
    assert [(r["user_id"], r["ts"], r["impressions"][0]["item_id"]) for r in requests] == [
        (2, 0, 10),
        (2, 1, 40),
        (5, 0, 30),
        (5, 1, 10),
        (5, 2, 20),
        (5, 3, 99),
    ]
    users = pq.read_table(out / "users.parquet").to_pylist()
    assert users[1]["timeline_item_id"] == [30, 10, 20, 99]  # file order, not item order
    assert users[1]["timeline_ts"] == [0, 1, 2, 3] and users[1]["timeline_action"] == [1, 1, 1, 1]
    assert read_roles(pq.read_schema(out / "users.parquet")).labels == ("click",)
    assert read_items(out)[0].tolist() == [10, 20, 30, 40, 99]

    pairs = "\n".join(f"{u} {i}" for u, i in [(5, 30), (2, 10), (5, 10), (5, 20), (2, 40), (5, 99)])
    (tmp_path / "pairs.dat").write_text(pairs)
    same = load_interactions(tmp_path / "pairs.dat", tmp_path / "pairs", InteractionOptions(format="pairs"))
    for name in ("requests", "users", "items"):
        assert pq.read_table(same / f"{name}.parquet").equals(pq.read_table(out / f"{name}.parquet"))


def test_text_log_with_string_ids_writes_the_mapping(tmp_path):
    (tmp_path / "log.txt").write_text("bob b a\nann a\n")
    out = load_interactions(tmp_path / "log.txt", tmp_path / "out")
    users = pq.read_table(out / "users.parquet").to_pylist()
    assert [(u["user_id"], u["timeline_item_id"]) for u in users] == [(1, [1]), (2, [2, 1])]  # ann=1, bob=2; a=1, b=2
    assert pq.read_table(out / "ids.parquet").to_pylist() == [
        {"kind": "user", "id": 1, "source_id": "ann"},
        {"kind": "user", "id": 2, "source_id": "bob"},
        {"kind": "item", "id": 1, "source_id": "a"},
        {"kind": "item", "id": 2, "source_id": "b"},
    ]
    assert read_items(out)[2] == {"source_id": ["a", "b"]}


def test_csv_and_parquet_give_identical_datasets(tmp_path):
    log = _random_log(seed=1, events=80)
    pacsv.write_csv(log, tmp_path / "log.csv")
    pq.write_table(log, tmp_path / "log.parquet")
    options = InteractionOptions(label_cols=("buy", "fav"), feature_cols=("price",))
    a = load_interactions(tmp_path / "log.csv", tmp_path / "a", options)
    b = load_interactions(tmp_path / "log.parquet", tmp_path / "b", options)
    for name in ("requests", "users", "items", "ids"):
        assert pq.read_table(a / f"{name}.parquet").equals(pq.read_table(b / f"{name}.parquet"), check_metadata=True)
    roles = read_roles(pq.read_schema(a / "requests.parquet"))
    assert roles.labels == ("buy", "fav") and roles.impression_features == ("price",)
    users = read_table(a / "users.parquet", "users").to_pylist()
    rows = log.to_pylist()
    first = min((r for r in rows if r["user_id"] == "u0"), key=lambda r: (r["timestamp"], r["item_id"]))
    u0 = next(u for u in users if u["user_id"] == 1)
    assert u0["timeline_action"][0] == first["buy"] | first["fav"] << 1


def _items_fixture(tmp_path: Path) -> tuple[Path, Path]:
    log = pa.table({"user_id": [1, 1, 2, 2], "item_id": ["m1", "m2", "m3", "m9"], "timestamp": [1, 2, 3, 4]})
    pq.write_table(log, tmp_path / "log.parquet")
    (tmp_path / "items.csv").write_text(
        "item_id,genre,year,lang,title,score\n"
        "m1,Drama|War,1995,en,Heat,0.5\n"
        "m2,Comedy,2001,fr,Amélie,0.25\n"
        "m3,,1980,en,Ran,1.0\n"
        "m4,Drama,2010,de,Unseen,0.0\n"
    )
    return tmp_path / "log.parquet", tmp_path / "items.csv"


def test_item_attribute_table_becomes_filterable_attributes(tmp_path):
    from sterling.index.attributes import AttributeStore
    from sterling.index.bloom import BloomIndex

    log, items_csv = _items_fixture(tmp_path)
    options = InteractionOptions(items_path=items_csv, display_cols=("title",))
    out = load_interactions(log, tmp_path / "out", options)
    roles = read_roles(pq.read_schema(out / "items.parquet"))
    assert roles.attributes == ("genre", "year", "lang")
    assert roles.display == ("title", "score", "source_id")  # floats are shown, not filtered on
    ids, attributes, display = read_items(out)
    assert ids.tolist() == [1, 2, 3, 4, 5]  # m1 m2 m3 m4 (only in the table) m9 (only in the log)
    assert attributes == [
        {"genre": ["Drama", "War"], "year": 1995, "lang": "en"},
        {"genre": ["Comedy"], "year": 2001, "lang": "fr"},
        {"genre": [], "year": 1980, "lang": "en"},
        {"genre": ["Drama"], "year": 2010, "lang": "de"},
        {},
    ]
    assert display["title"] == ["Heat", "Amélie", "Ran", "Unseen", None]
    assert display["source_id"] == ["m1", "m2", "m3", "m4", "m9"]
    index = BloomIndex.build(AttributeStore.build(attributes))
    assert index.candidates(index.compile("genre:Drama AND year < 2000")).tolist() == [0]
    assert index.candidates(index.compile("lang:en")).tolist() == [0, 2]

    table = pacsv.read_csv(items_csv)
    genre = [s.split("|") if s else [] for s in table.column("genre").to_pylist()]
    table = table.set_column(1, "genre", pa.array(genre, pa.list_(pa.string())))
    pq.write_table(table, tmp_path / "items.parquet")
    parquet = replace_items(options, tmp_path / "items.parquet")
    again = load_interactions(log, tmp_path / "again", parquet)
    assert pq.read_table(again / "items.parquet").equals(pq.read_table(out / "items.parquet"), check_metadata=True)


def replace_items(options: InteractionOptions, path: Path) -> InteractionOptions:
    from dataclasses import replace

    return replace(options, items_path=path)


@pytest.mark.parametrize(
    ("name", "content", "options", "message"),
    [
        ("log.csv", "user_id,item\n1,2\n", {}, r"no item column 'item_id' \(columns: \['user_id', 'item'\]\)"),
        ("log.csv", "user_id,item_id\n", {}, "no interactions"),
        ("log.txt", "", {}, "no interactions"),
        ("log.txt", "1 2 3\n7\n", {}, "line 2: user '7' with no items"),
        ("log.txt", "1 2 3\n", {"format": "pairs"}, "line 1: 3 fields; the pairs format has `user item`"),
        ("log.csv", "user_id,item_id\n1,2.5\n", {}, "item ids must be integers or strings, not double"),
        ("log.csv", "user_id,item_id\n1,2\n,3\n", {}, "user column 'user_id' has 1 empty values"),
        ("log.csv", "user_id,item_id,timestamp\n1,2,1.5\n", {}, "timestamp column 'timestamp' must hold integer"),
        ("log.csv", "user_id,item_id,timestamp\n1,2,-5\n", {}, r"must be unix seconds in \[0, 2\*\*34\)"),
        ("log.csv", "user_id,item_id,t\n1,2,5\n", {"ts_col": "when"}, "no timestamp column 'when'"),
        ("log.csv", "user_id,item_id,buy\n1,2,3\n", {"label_cols": ("buy",)}, "label column 'buy' holds 3, not 0/1"),
        ("log.txt", "1 2\n", {"label_cols": ("buy",)}, "a text log has no timestamp, label or feature columns"),
        ("log.csv", "user_id,item_id\n1,2\n", {"feature_cols": ("price",)}, "no feature column 'price'"),
    ],
)
def test_bad_input_errors_name_the_problem(tmp_path, name, content, options, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        load_interactions(tmp_path / name, tmp_path / "out", InteractionOptions(**options))


def test_bad_attribute_tables(tmp_path):
    log, _ = _items_fixture(tmp_path)
    (tmp_path / "dup.csv").write_text("item_id,lang\nm1,en\nm2,fr\nm1,de\n")
    with pytest.raises(DataError, match="dup.csv: item m1 has 2 rows"):
        load_interactions(log, tmp_path / "out", InteractionOptions(items_path=tmp_path / "dup.csv"))
    (tmp_path / "noid.csv").write_text("id,lang\nm1,en\n")
    with pytest.raises(DataError, match="noid.csv: no item column 'item_id'"):
        load_interactions(log, tmp_path / "out", InteractionOptions(items_path=tmp_path / "noid.csv"))
    with pytest.raises(FileNotFoundError, match="missing.csv: no such file"):
        load_interactions(log, tmp_path / "out", InteractionOptions(items_path=tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match="unknown format 'tsv'"):
        InteractionOptions(format="tsv")


def test_cli_subcommand(tmp_path, capsys):
    log, items_csv = _items_fixture(tmp_path)
    pacsv.write_csv(pq.read_table(log).rename_columns(["uid", "iid", "when"]), tmp_path / "log.csv")
    (tmp_path / "items.csv").write_text((tmp_path / "items.csv").read_text().replace("item_id,", "iid,", 1))
    argv = ["data", "interactions", str(tmp_path / "log.csv"), "--out", str(tmp_path / "out")]
    argv += ["--user-col", "uid", "--item-col", "iid", "--ts-col", "when", "--window-s", "2"]
    argv += ["--items", str(tmp_path / "items.csv"), "--display-col", "title,score"]
    assert cli.main(argv) == 0
    assert f"wrote {tmp_path / 'out'}" in capsys.readouterr().out
    requests = pq.read_table(tmp_path / "out" / "requests.parquet").to_pylist()
    assert [[i["item_id"] for i in r["impressions"]] for r in requests] == [[1, 2], [3, 5]]  # window 2 s
    assert read_roles(pq.read_schema(tmp_path / "out" / "items.parquet")).display == ("title", "score", "source_id")
    assert cli.main([*argv, "--label-col", "a,b"]) == 2
    assert "no label column 'a'" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_hstu_trains_on_a_converted_text_log(tmp_path):
    from dataclasses import replace

    from sterling.train.retrieval import RetrievalConfig, train_retrieval

    rng = np.random.default_rng(0)
    lines = [" ".join(map(str, [user, *rng.integers(1, 40, rng.integers(3, 12))])) for user in range(1, 30)]
    (tmp_path / "log.txt").write_text("\n".join(lines) + "\n")
    data = load_interactions(tmp_path / "log.txt", tmp_path / "data")
    cfg = replace(RetrievalConfig(encoder="hstu", dim=16, num_layers=1, max_len=20), max_steps=2)
    report = train_retrieval(data, cfg, log=lambda _: None, out_dir=tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "best").is_dir()
    assert report.test is not None
