"""The update log: every acknowledged item update, on disk before its answer.

An SQLite database (the standard library's ``sqlite3``) in WAL journal mode with
``synchronous=FULL``: :meth:`UpdateLog.append` is one transaction, durable when it returns, so a
server that answers 200 after it has the update back after a crash. SQLite's journal makes a
transaction torn by a crash invisible (it never committed, so it was never acknowledged). Each entry
is a sequence number (increasing, never reused), the update as JSON and the CRC32 of that JSON: an
entry damaged on disk fails its check, and it and every later entry are the corrupt tail, reported
and discarded by :meth:`UpdateLog.entries`, never half-applied. ``UpdateLog(None)`` keeps the same
log in memory (``sterling serve --no-log``: gone with the process).

The JSON holds the ids, each upsert's embedding (float32 values as exact decimal floats; ``null``:
the model embeds the item from its attributes), the attribute dicts and the deleted ids. The log
also keeps its id (a random hex string) and its *base*: the snapshot compaction last folded it into
(:meth:`UpdateLog.fold`, :mod:`sterling.serving.compaction`) and the sequence number that snapshot
holds the updates through; the entries up to it are trimmed::

    log = UpdateLog(Path("runs/snap.updates.sqlite"))
    seq = log.append(update)            # durable now
    for seq, update in log.entries():   # oldest first
        update.apply(model)
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sterling.retrieval.model import RetrievalModel

__all__ = ["Update", "UpdateLog", "decode_update", "encode_update"]

log = logging.getLogger("sterling.serving")


@dataclass(frozen=True)
class Update:
    """One acknowledged item update: upserts (ids, embeddings, attributes) and deletes.

    ``embeddings`` is float32 ``[M, D]``, or one ``[D]`` vector or None per upsert: None asks the
    model the update is applied to for the item's embedding (its item tower over the attributes,
    :meth:`RetrievalModel.embed_items`), so a snapshot swapped in embeds it with its own tower.
    """

    ids: list[int]
    embeddings: torch.Tensor | Sequence[torch.Tensor | None]
    attributes: list[dict]
    deletes: list[int]

    @classmethod
    def of(
        cls, ids: list[int], embeddings: Sequence[Sequence[float] | None], attributes: list[dict], deletes: list[int]
    ) -> Update:
        """An update from plain values (a request's JSON, a log entry): one embedding per upsert, a
        list of floats or None (the model embeds the item); a ValueError if their lengths differ or a
        value is not finite in float32."""
        dims = {len(e) for e in embeddings if e is not None}
        if len(dims) > 1:
            raise ValueError(f"the embeddings have different lengths {sorted(dims)}")
        if all(e is not None for e in embeddings):
            vectors: torch.Tensor | list = torch.tensor(list(embeddings), dtype=torch.float32).view(
                len(embeddings), dims.pop() if dims else 0
            )
        else:  # those left out are embedded on the model thread, by the model that applies the update
            vectors = [None if e is None else torch.tensor(e, dtype=torch.float32) for e in embeddings]
        given = vectors if isinstance(vectors, torch.Tensor) else [v for v in vectors if v is not None]
        if not all(bool(torch.isfinite(v).all()) for v in given):
            raise ValueError("upserted embeddings must be finite float32 values (no NaN or inf, |x| < 3.4e38)")
        return cls(list(ids), vectors, list(attributes), list(deletes))

    def apply(self, model: RetrievalModel) -> int:
        """Upserts, then deletes; returns the number deleted."""
        if self.ids:
            model.upsert(self.ids, self.vectors(model), self.attributes)
        return model.delete(self.deletes) if self.deletes else 0

    def vectors(self, model: RetrievalModel) -> torch.Tensor:
        """float32 ``[M, D]``: the upserts' embeddings, those not given embedded by ``model``
        (before anything changes: a model that cannot embed items raises a ValueError here)."""
        if isinstance(self.embeddings, torch.Tensor):
            return self.embeddings
        rows = list(self.embeddings)
        cold = [i for i, e in enumerate(rows) if e is None]
        if cold:
            for i, e in zip(cold, model.embed_items([self.attributes[i] for i in cold])):
                rows[i] = e
        widths = sorted({len(e) for e in rows})
        if len(widths) > 1:
            raise ValueError(f"the embeddings have different lengths {widths}; the model's are {model.dim} floats")
        return torch.stack(rows) if rows else torch.zeros(0, model.dim)

    @staticmethod
    def merged(updates: Sequence[Update]) -> Update:
        """One update with the effect of ``updates`` applied in order: each id's last operation."""
        last: dict[int, tuple[torch.Tensor | None, dict] | None] = {}  # id → (embedding, attributes), None: deleted
        for u in updates:
            for i, e, a in zip(u.ids, u.embeddings, u.attributes):
                last.pop(i, None)
                last[i] = (e, a)
            for i in u.deletes:
                last.pop(i, None)
                last[i] = None
        ids = [i for i, v in last.items() if v is not None]
        given = [last[i][0] for i in ids]
        if any(e is None for e in given):  # some are embedded by the model they are applied to
            vectors: torch.Tensor | list = given
        else:
            dim = next((u.embeddings.shape[1] for u in updates if isinstance(u.embeddings, torch.Tensor)), 0)
            vectors = torch.stack(given) if ids else torch.zeros(0, dim)
        return Update(ids, vectors, [last[i][1] for i in ids], [i for i, v in last.items() if v is None])


def encode_update(update: Update) -> bytes:
    """The update as UTF-8 JSON (embeddings' float32 values round-trip exactly)."""
    if isinstance(update.embeddings, torch.Tensor):
        embeddings = update.embeddings.to(torch.float32).tolist()
    else:
        embeddings = [None if e is None else e.to(torch.float32).tolist() for e in update.embeddings]
    body = {"ids": update.ids, "embeddings": embeddings, "attributes": update.attributes, "deletes": update.deletes}
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def decode_update(data: bytes) -> Update:
    """The :class:`Update` of :func:`encode_update`'s bytes."""
    body = json.loads(data)
    return Update.of(body["ids"], body["embeddings"], body["attributes"], body["deletes"])


class UpdateLog:
    """The durable, ordered log of acknowledged updates at ``path`` (created if missing).

    Thread-safe. The service appends one update at a time, each before the model thread applies
    it, so entries are in the order the updates were applied.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = None if path is None else Path(path)
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                ":memory:" if self.path is None else self.path, check_same_thread=False, isolation_level=None
            )
        except sqlite3.Error as e:
            raise ValueError(f"cannot open the update log {self.path}: {e}") from None
        try:
            if self.path is not None:
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode != "wal":
                    raise ValueError(f"{self.path}: the update log needs SQLite's WAL journal mode, got {mode!r}")
                self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS updates (seq INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL, "
                "crc INTEGER NOT NULL)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('id', ?)", (uuid.uuid4().hex,))
            self.id = str(self._db.execute("SELECT value FROM meta WHERE key = 'id'").fetchone()[0])
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise ValueError(f"{self.path} is not an update log: {e}") from None

    @property
    def durable(self) -> bool:
        """Whether the log is on disk (False: in memory, gone with the process)."""
        return self.path is not None

    @property
    def base(self) -> tuple[Path | None, int]:
        """The snapshot the log was last folded into (None: never) and the sequence number it holds
        the updates through: the entries up to it are trimmed, that snapshot carries them."""
        with self._lock:
            rows = dict(self._db.execute("SELECT key, value FROM meta WHERE key IN ('base', 'base_seq')").fetchall())
        return (Path(rows["base"]) if "base" in rows else None), int(rows.get("base_seq", 0))

    def fold(self, snapshot: Path, through: int) -> None:
        """Record that ``snapshot`` holds every update through sequence number ``through`` and trim
        those entries: one transaction, so a crash leaves the log either as it was or folded."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('base', ?)", (str(snapshot),))
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('base_seq', ?)", (str(through),))
                self._db.execute("DELETE FROM updates WHERE seq <= ?", (through,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    @property
    def last_seq(self) -> int:
        """The sequence number of the last entry ever appended (0: none); trimming keeps it."""
        with self._lock:
            row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'updates'").fetchone()
        return 0 if row is None else int(row[0])

    def append(self, update: Update) -> int:
        """Commit ``update`` (durable when this returns); its sequence number."""
        body = encode_update(update)
        with self._lock:
            cursor = self._db.execute("INSERT INTO updates (body, crc) VALUES (?, ?)", (body, zlib.crc32(body)))
        return int(cursor.lastrowid)

    def discard(self, seq: int) -> None:
        """Remove entry ``seq`` (an update the model refused after it was logged: never acknowledged)."""
        with self._lock:
            self._db.execute("DELETE FROM updates WHERE seq = ?", (seq,))

    def entries(self, after: int = 0, through: int | None = None) -> list[tuple[int, Update]]:
        """``(seq, update)`` of every entry after sequence number ``after`` (and up to ``through``,
        if given), oldest first. An entry
        that fails its checksum or does not decode ends the log: it and all later entries are
        deleted (logged as a warning), and the entries before it are returned."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, body, crc FROM updates WHERE seq > ? AND seq <= ? ORDER BY seq",
                (after, (1 << 62) if through is None else through),
            ).fetchall()
        out = []
        for seq, body, crc in rows:
            try:
                if zlib.crc32(body) != crc:
                    raise ValueError("checksum mismatch")
                out.append((int(seq), decode_update(body)))
            except (ValueError, KeyError, TypeError) as e:
                log.warning(
                    "%s: entry %d is corrupt (%s): it and %d later entries are discarded",
                    self.path,
                    seq,
                    e,
                    len(rows) - len(out) - 1,
                )
                with self._lock:
                    self._db.execute("DELETE FROM updates WHERE seq >= ?", (seq,))
                break
        return out

    def close(self) -> None:
        with self._lock:
            self._db.close()
