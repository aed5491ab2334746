"""Compaction: fold the update log into a new snapshot, then trim the log.

A served model is a snapshot plus the live updates of its update log
(:mod:`sterling.serving.update_log`). Compaction writes that state as a snapshot of its own (the
fresh items placed in their IVF lists, deleted items dropped, :meth:`RetrievalModel.compact`),
atomically, and then, in one log transaction, records it as the log's *base* and trims the entries
it holds. A compacted snapshot's manifest says which log and through which sequence number
(``meta["update_log"] = {"id": ..., "seq": ...}``), and it carries those updates folded into one
(``updates.json``, each item's last operation, in the log's encoding), so that a snapshot
published later is served with them too.

What a snapshot is served with (:func:`pending_updates`)::

    the log's own compacted snapshot (same log id, seq >= the log's base seq):
        the entries after its seq
    any other snapshot (a fresh publish, an older compaction, a server started again on the
    snapshot it was first started on):
        the base snapshot's carried updates, then the entries after the base seq

A crash anywhere in between leaves either the log as it was (the new snapshot is an unused
directory) or the log folded: both give the acknowledged state on the next start.

Example::

    out = compact(Path("runs/snap"), UpdateLog(Path("runs/snap.updates.sqlite")), Path("runs/compacted-42"))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sterling.retrieval.model import RetrievalModel
from sterling.retrieval.publish import load_model, rewrite_snapshot
from sterling.serving.shards import SHARDS_FILE
from sterling.serving.update_log import Update, UpdateLog, decode_update, encode_update
from sterling.snapshot import MANIFEST, SnapshotError, read_blob, read_manifest, read_snapshot

__all__ = [
    "CARRIED_FILE",
    "LogPosition",
    "carried_update",
    "compact",
    "compacted_path",
    "default_log_path",
    "pending_updates",
    "position_of",
]

CARRIED_FILE = "updates.json"  # a compacted snapshot's updates through its seq, folded into one


@dataclass(frozen=True)
class LogPosition:
    """How far into which update log (its id, and its path: None for a log in memory) a compacted
    snapshot holds the updates."""

    log_id: str
    seq: int
    path: Path | None


def position_of(snapshot: Path) -> LogPosition | None:
    """The log position a compacted snapshot holds (None: a published or sharded snapshot)."""
    if not (Path(snapshot) / MANIFEST).is_file():
        return None
    held = read_manifest(snapshot)["meta"].get("update_log")
    if held is None:
        return None
    return LogPosition(str(held["id"]), int(held["seq"]), None if held.get("path") is None else Path(held["path"]))


def default_log_path(snapshot: Path) -> Path:
    """Where ``sterling serve`` keeps the update log of ``snapshot`` by default: the log a compacted
    snapshot was compacted from (its entries after the snapshot's seq are the rest of the state),
    else beside the snapshot, ``<snapshot>.updates.sqlite``."""
    snapshot = Path(snapshot)
    held = position_of(snapshot)
    if held is not None and held.path is not None:
        return held.path
    return snapshot.parent / f"{snapshot.name}.updates.sqlite"


def carried_update(snapshot: Path) -> Update:
    """The updates a compacted snapshot holds, folded into one.

    Raises:
        SnapshotError: ``snapshot`` is missing, damaged or not a compacted snapshot.
    """
    data = read_blob(snapshot, CARRIED_FILE)
    if data is None:
        raise SnapshotError(f"{snapshot} is not a compacted snapshot (its manifest lists no {CARRIED_FILE})")
    return decode_update(data)


def pending_updates(snapshot: Path, log: UpdateLog, through: int | None = None) -> list[Update]:
    """The updates that, applied in order to the snapshot at ``snapshot``, give the acknowledged
    state through sequence number ``through`` (default: the whole log)."""
    own = position_of(snapshot)
    if own is not None and own.log_id == log.id and own.seq >= log.base[1]:
        return [u for _, u in log.entries(after=own.seq, through=through)]
    return _all_updates(log, through)


def _all_updates(log: UpdateLog, through: int | None) -> list[Update]:
    """Every update of the log through ``through``: those its base snapshot carries (trimmed from
    the log), then its entries after the base's seq."""
    base, base_seq = log.base
    entries = [u for _, u in log.entries(after=base_seq, through=through)]
    if base is None:
        return entries
    try:
        return [carried_update(base), *entries]
    except (SnapshotError, OSError) as e:
        raise SnapshotError(
            f"the update log {log.path} was compacted into {base}, which holds its updates through seq "
            f"{base_seq}, but it cannot be read: {e}"
        ) from None


def compacted_path(root: Path, through: int) -> Path:
    """A new directory name for the snapshot compacted through ``through`` under ``root``:
    ``compacted-<seq>`` (``.1``, ``.2``, … if taken: never over an earlier one, which may be the
    log's base)."""
    out, again = Path(root) / f"compacted-{through}", 0
    while out.exists():
        again += 1
        out = Path(root) / f"compacted-{through}.{again}"
    return out


def compact(
    snapshot: Path,
    log: UpdateLog,
    out: Path,
    through: int | None = None,
    loader: Callable[[Path], RetrievalModel] = load_model,
) -> Path:
    """Write ``snapshot`` with the log's updates through ``through`` (default: all) folded in to
    ``out`` (atomically), then fold the log into it: record it as the base and trim the entries.

    Raises:
        ValueError: a sharded snapshot (compact the whole one, then split it), or ``out`` is
            ``snapshot``.
        SnapshotError: a snapshot that cannot be read or written.
    """
    snapshot, out = Path(snapshot), Path(out)
    if (snapshot / SHARDS_FILE).is_file():
        raise ValueError(f"{snapshot} is a sharded snapshot: compact the whole snapshot, then split it again")
    if out.resolve() == snapshot.resolve():
        raise ValueError(f"the compacted snapshot must go to a new path, not over {snapshot}, which it reads")
    through = log.last_seq if through is None else through
    model = loader(snapshot)
    pending = pending_updates(snapshot, log, through)
    if pending:
        Update.merged(pending).apply(model)
    model.compact()
    meta = {
        "update_log": {"id": log.id, "seq": through, "path": None if log.path is None else str(log.path.resolve())},
        "compacted_from": str(snapshot),
    }
    carried = Update.merged(_all_updates(log, through))
    rewrite_snapshot(
        read_snapshot(snapshot),
        out,
        model.index,
        model.static_tensors()["cache"],
        meta,
        {CARRIED_FILE: encode_update(carried)},
    )
    log.fold(out, through)
    return out
