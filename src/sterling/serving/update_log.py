"""The update log: every acknowledged item update, on disk before its answer.

An SQLite database (the standard library's ``sqlite3``) in WAL journal mode with
``synchronous=FULL``: :meth:`UpdateLog.append` is one transaction, durable when it returns, so a
server that answers 200 after it has the update back after a crash. SQLite's journal makes a
transaction torn by a crash invisible (it never committed, so it was never acknowledged). Each entry
is a sequence number (increasing, never reused), the update as JSON and the CRC32 of that JSON: an
entry damaged on disk fails its check, and it and every later entry are the corrupt tail, reported
and discarded by :meth:`UpdateLog.entries`, never half-applied.

The JSON holds the ids, each upsert's embedding (float32 values as exact decimal floats; ``null``:
the model embeds the item from its attributes), the attribute dicts and the deleted ids::

    log = UpdateLog(Path("runs/updates.sqlite"))
    seq = log.append(update)            # durable now
    for seq, update in log.entries():   # oldest first
        update.apply(model)
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import zlib
from pathlib import Path

import torch

from sterling.serving.service import Update

__all__ = ["UpdateLog", "decode_update", "encode_update"]

log = logging.getLogger("sterling.serving")


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

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise ValueError(f"{self.path}: the update log needs SQLite's WAL journal mode, got {mode!r}")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS updates (seq INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL, "
                "crc INTEGER NOT NULL)"
            )
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise ValueError(f"{self.path} is not an update log: {e}") from None

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

    def entries(self, after: int = 0) -> list[tuple[int, Update]]:
        """``(seq, update)`` of every entry after sequence number ``after``, oldest first. An entry
        that fails its checksum or does not decode ends the log: it and all later entries are
        deleted (logged as a warning), and the entries before it are returned."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, body, crc FROM updates WHERE seq > ? ORDER BY seq", (after,)
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

    def trim(self, up_to: int) -> None:
        """Delete the entries up to and including sequence number ``up_to`` (folded into a snapshot)."""
        with self._lock:
            self._db.execute("DELETE FROM updates WHERE seq <= ?", (up_to,))

    def close(self) -> None:
        with self._lock:
            self._db.close()
