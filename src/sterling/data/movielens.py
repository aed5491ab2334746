"""MovieLens (ML-100K, ML-1M, ml-latest-small) as request-format datasets.

Layouts, detected from the files present:

* **ML-100K**: ``u.data`` (TAB: user, item, rating, ts), ``u.item`` (latin-1, ``|``: id, title,
  release date, ..., 19 genre flags), ``u.user`` (``|``: id, age, gender, occupation, zip).
* **ML-1M**: ``ratings.dat`` or ``ratings.dat.gz`` (``::``), ``movies.dat`` (latin-1, ``::``, genres
  ``|``-separated, year in the title), ``users.dat`` (``::``: id, gender, age band, occupation code, zip).
* **ml-latest-small**: ``ratings.csv`` (half-star ratings), ``movies.csv`` (genres ``|``-separated,
  year in the title); no user features.

Requests: a user's ratings sorted by (ts, item_id) are cut greedily: a request starts with the first
rating not yet taken and holds every following rating with ts < start ts + ``window_s``. The request
ts is its first rating's ts, so a request's history (timeline events with ts < request ts) never
holds its own ratings. ``window_s = 1`` gives the same-second groups of the data README (49,439
requests for ML-100K). The default window, ten minutes, is closer to a served page; it gives
(requests; impressions per request mean / p50 / p90 / max; history at request time mean / max):

* ML-100K: 6,360 requests; 15.7 / 10 / 38 / 130; 102.5 / 686
* ml-1m-subset: 27,982 requests; 17.4 / 11 / 44 / 234; 248.8 / 1,849
* ml-latest-small: 10,371 requests; 9.7 / 3 / 29 / 400; 587.2 / 2,694

Columns: items ``genre`` list<string> (ML-100K flags as names, ml-latest's ``(no genres listed)``
as an empty list), ``year`` int32 (null when unknown), display ``title``; context ``hour`` (int8, UTC
hour of the request ts); labels ``like`` (rating ≥ 4) and ``love`` (rating = 5); impression feature
``rating`` (int8 stars; float32 for ml-latest-small's half stars); user features ``age`` (int8: years
in ML-100K, the band code in ML-1M), ``gender`` (string), ``occupation`` (string in ML-100K, int8
code in ML-1M). The timeline holds every rating with action bit 0 = like, bit 1 = love.

Example::

    from sterling.data.movielens import load_movielens
    load_movielens("/data/ml-100k", "runs/ml-100k")
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from sterling.data.interactions import DEFAULT_WINDOW_S, Events, request_starts, write_dataset
from sterling.data.schema import ITEM_ID, USER_ID, DataError

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)  # fmt: skip
NO_GENRES = "(no genres listed)"
_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")


class MovieLensFormatError(DataError):
    """A MovieLens file does not have the documented layout."""


@dataclass(frozen=True)
class _Raw:
    """Parsed files: ratings [n] and the item and user columns (users empty for ml-latest-small)."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    ts: np.ndarray
    items: dict
    users: dict


def detect_layout(src_dir: str | Path) -> str:
    """``"ml-100k"``, ``"ml-1m"`` or ``"ml-latest"`` from the files in ``src_dir``."""
    src = Path(src_dir)
    if (src / "u.data").is_file():
        return "ml-100k"
    if (src / "ratings.dat").is_file() or (src / "ratings.dat.gz").is_file():
        return "ml-1m"
    if (src / "ratings.csv").is_file():
        return "ml-latest"
    raise FileNotFoundError(f"{src}: no MovieLens ratings file (u.data, ratings.dat[.gz] or ratings.csv)")


def _lines(path: Path, encoding: str) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding=encoding) as f:
        return [line for line in f.read().splitlines() if line.strip()]


def _ratings_text(path: Path, separator: str) -> tuple[np.ndarray, ...]:
    """user, item, rating, ts columns of an integer ratings file with 4 fields per line."""
    lines = _lines(path, "latin-1")
    try:
        values = np.array(" ".join(lines).replace(separator, " ").split(), dtype=np.int64)
    except ValueError as e:
        raise MovieLensFormatError(f"{path}: a field is not an integer ({e})") from None
    if len(values) != 4 * len(lines):
        raise MovieLensFormatError(f"{path}: expected 4 {separator!r}-separated integers per line")
    return tuple(values.reshape(-1, 4).T)


def _fields(path: Path, separator: str, count: int, encoding: str = "latin-1") -> list[list[str]]:
    rows = [line.split(separator) for line in _lines(path, encoding)]
    for number, row in enumerate(rows, 1):
        if len(row) != count:
            raise MovieLensFormatError(f"{path} line {number}: {len(row)} fields, expected {count}")
    return rows


def _year(title: str) -> int | None:
    match = _YEAR_IN_TITLE.search(title)
    return int(match.group(1)) if match else None


def _items(ids: list[int], titles: list[str], genres: list[list[str]], years: list[int | None]) -> dict:
    return {
        ITEM_ID: np.array(ids, np.int64),
        "genre": pa.array(genres, pa.list_(pa.string())),
        "year": pa.array(years, pa.int32()),
        "title": titles,
    }


def _read_100k(src: Path) -> _Raw:
    user, item, rating, ts = _ratings_text(src / "u.data", "\t")
    rows = _fields(src / "u.item", "|", 5 + len(ML100K_GENRES))
    genres = [[g for g, flag in zip(ML100K_GENRES, row[5:]) if flag == "1"] for row in rows]
    years = [int(row[2][-4:]) if row[2] else None for row in rows]
    items = _items([int(r[0]) for r in rows], [r[1] for r in rows], genres, years)
    people = _fields(src / "u.user", "|", 5)
    users = {
        USER_ID: np.array([int(p[0]) for p in people], np.int64),
        "age": np.array([int(p[1]) for p in people], np.int8),
        "gender": [p[2] for p in people],
        "occupation": [p[3] for p in people],
    }
    return _Raw(user, item, rating.astype(np.int8), ts, items, users)


def _read_1m(src: Path) -> _Raw:
    ratings = src / "ratings.dat"
    user, item, rating, ts = _ratings_text(ratings if ratings.is_file() else src / "ratings.dat.gz", "::")
    rows = _fields(src / "movies.dat", "::", 3)
    genres = [row[2].split("|") if row[2] else [] for row in rows]
    items = _items([int(r[0]) for r in rows], [r[1] for r in rows], genres, [_year(r[1]) for r in rows])
    people = _fields(src / "users.dat", "::", 5)
    users = {
        USER_ID: np.array([int(p[0]) for p in people], np.int64),
        "gender": [p[1] for p in people],
        "age": np.array([int(p[2]) for p in people], np.int8),
        "occupation": np.array([int(p[3]) for p in people], np.int8),
    }
    return _Raw(user, item, rating.astype(np.int8), ts, items, users)


def _csv(path: Path, types: dict[str, pa.DataType]) -> pa.Table:
    table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=types))
    missing = [name for name in types if name not in table.column_names]
    if missing:
        raise MovieLensFormatError(f"{path}: missing columns {missing}")
    return table


def _read_latest(src: Path) -> _Raw:
    ratings = _csv(
        src / "ratings.csv",
        {"userId": pa.int64(), "movieId": pa.int64(), "rating": pa.float32(), "timestamp": pa.int64()},
    )
    user, item, rating, ts = (ratings.column(n).to_numpy() for n in ("userId", "movieId", "rating", "timestamp"))
    movies = _csv(src / "movies.csv", {"movieId": pa.int64(), "title": pa.string(), "genres": pa.string()})
    titles = movies.column("title").to_pylist()
    genres = [[] if g == NO_GENRES else g.split("|") for g in movies.column("genres").to_pylist()]
    items = _items(movies.column("movieId").to_pylist(), titles, genres, [_year(t) for t in titles])
    return _Raw(user, item, rating, ts, items, {})


READERS = {"ml-100k": _read_100k, "ml-1m": _read_1m, "ml-latest": _read_latest}


def _lookup(ids: np.ndarray, wanted: np.ndarray, what: str, where: Path) -> np.ndarray:
    """Row of each ``wanted`` id in ``ids``; an unknown id is an error."""
    order = np.argsort(ids, kind="stable")
    index = np.minimum(np.searchsorted(ids[order], wanted), len(ids) - 1)
    missing = ids[order][index] != wanted
    if missing.any():
        raise MovieLensFormatError(f"{where}: ratings name {what} {wanted[missing][0]}, which the {what} file lacks")
    return order[index]


def load_movielens(src_dir: str | Path, out_dir: str | Path, window_s: int = DEFAULT_WINDOW_S) -> Path:
    """Convert the MovieLens files in ``src_dir`` into a request-format dataset in ``out_dir``."""
    if window_s < 1:
        raise ValueError(f"window_s must be at least 1 second, got {window_s}")
    src = Path(src_dir)
    raw = READERS[detect_layout(src)](src)
    order = np.lexsort((raw.item, raw.ts, raw.user))
    user, item, rating, ts = raw.user[order], raw.item[order], raw.rating[order], raw.ts[order]
    _lookup(raw.items[ITEM_ID], np.unique(item), "item", src)
    users = {}
    if raw.users:
        rows = _lookup(raw.users[USER_ID], np.unique(user), "user", src)
        users = {name: np.asarray(values)[rows] for name, values in raw.users.items() if name != USER_ID}
    labels = {"like": (rating >= 4).astype(np.int8), "love": (rating == 5).astype(np.int8)}
    return write_dataset(
        out_dir,
        Events(user, item, ts, labels, {"rating": rating}),
        request_starts(user, ts, window_s),
        raw.items,
        attributes=("genre", "year"),
        display=("title",),
        context=lambda request_ts: {"hour": ((request_ts // 3600) % 24).astype(np.int8)},
        users=users,
    )
