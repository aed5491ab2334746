"""The serving state behind the HTTP API: the current model, its snapshot, live updates and swaps.

Every use of the model runs on the micro-batcher's one thread (:mod:`sterling.serving.batcher`):
retrieve and rank requests in batches, item updates and the final step of a swap alone and in
arrival order. So an acknowledged update is in every later answer, and a swap lands between two
batches: requests in flight finish on the old model.

Every update is committed to the update log (:mod:`sterling.serving.update_log`; on disk, or in
memory without one) before it is applied, and numbered there: the model thread keeps the sequence
number of the last update applied. A snapshot is served with the log's updates it does not hold
(:func:`~sterling.serving.compaction.pending_updates`): at start, on a swap and after a compaction.

A swap (:meth:`Service.reload`) loads the new snapshot on another thread (checksums verified),
applies the updates acknowledged so far, answers a warm-up request, and only then hands the model
thread a short step that applies the updates acknowledged meanwhile and switches. A snapshot that
fails any of this is refused and the old model keeps serving. A compaction (:meth:`Service.compact`)
writes the served state as a new snapshot, folds the log into it and swaps to it the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sterling.retrieval.model import RetrievalModel
from sterling.retrieval.publish import load_model
from sterling.retrieval.rank import Trace
from sterling.serving.batcher import BatcherConfig, MicroBatcher
from sterling.serving.compaction import compact, compacted_path, pending_updates
from sterling.serving.metrics import STAGES, ServingMetrics
from sterling.serving.shards import SHARDS_FILE
from sterling.serving.update_log import Update, UpdateLog
from sterling.serving.users import UserStore, encode_feature
from sterling.snapshot import MANIFEST, SnapshotError

__all__ = ["Limits", "OutsideSnapshotRoot", "Query", "ReloadInProgress", "Service", "SnapshotInfo"]

log = logging.getLogger("sterling.serving")


class ReloadInProgress(RuntimeError):
    """A reload or compaction was asked for while another one runs."""


class OutsideSnapshotRoot(PermissionError):
    """A reload of a path outside the snapshot root (the same error whether the path exists or not)."""


@dataclass(frozen=True)
class Limits:
    """Request size limits (a request beyond one is refused with a 4xx).

    Args:
        max_k (int | None): most results per request (None: the model's ``k0``).
        max_history (int): most history events a request may carry (and most ids it excludes).
        max_filter_chars (int): longest filter expression.
        max_rank_items (int): most items one rank request scores.
        max_update_items (int): most items one update upserts or deletes.
        max_body_bytes (int): largest request body.
    """

    max_k: int | None = None
    max_history: int = 10_000
    max_filter_chars: int = 2_000
    max_rank_items: int = 1_000
    max_update_items: int = 10_000
    max_body_bytes: int = 16 << 20


@dataclass(frozen=True)
class Query:
    """One request's user side and what it asks for (checked against the limits, not yet the model)."""

    history: list[int]
    actions: list[int]
    features: dict[str, int]
    filter: str | None = None
    k: int = 10
    items: list[int] | None = None  # rank: the items to score
    tasks: tuple[str, ...] | None = None
    value: str | None = None  # a Value Model *name*
    exclude_seen: bool = False  # retrieve: never answer an item of the history (stored + sent)
    exclude_ids: list[int] | None = None  # retrieve: nor these

    def excluded(self) -> list[int]:
        """The item ids this request must not be answered with."""
        return (self.history if self.exclude_seen else []) + list(self.exclude_ids or [])


@dataclass(frozen=True)
class SnapshotInfo:
    """The snapshot served: its path, version (sha256 of its manifest, 16 hex) and creation time."""

    path: str
    version: str
    created_at: str
    loaded_at: float = field(default_factory=time.time)


class Service:
    """The model, the batcher and the bookkeeping of one server.

    Args:
        snapshot (Path): the snapshot to serve first.
        users (Path | None): a ``users.parquet`` to look requests' users up in.
        value_formulas (Mapping[str, str]): named Value Model formulas requests may pick;
            ``"default"`` is the snapshot's own.
        batcher (BatcherConfig): micro-batching.
        limits (Limits): request size limits.
        freeze_gc (bool): ``gc.freeze()`` once a model serves, so the cyclic GC never walks its
            objects again (a full pass over a 1M-item model's 285k objects pauses 120 ms); for a
            process of its own (``sterling serve``), since it freezes everything alive.
        loader (Callable[[Path], RetrievalModel] | None): loads a snapshot path as the served
            model (default :func:`load_model`; the Ray Serve ingress passes one that builds a
            :class:`~sterling.serving.shards.ShardedModel` over its shard deployments).
        snapshot_root (Path | None): :meth:`reload` loads only snapshots under this directory
            (symbolic links resolved; default: the parent of ``snapshot``).
        update_log (UpdateLog | None): the log of acknowledged updates
            (:mod:`sterling.serving.update_log`): the first snapshot is served with the updates
            it does not hold (one it refuses is an error: the service does not start without an
            acknowledged update), and each update is committed to it before :meth:`update`
            returns. None: a log in memory (updates are gone with the process).
    """

    def __init__(
        self,
        snapshot: Path,
        users: Path | None = None,
        value_formulas: Mapping[str, str] = {},
        batcher: BatcherConfig = BatcherConfig(),
        limits: Limits = Limits(),
        freeze_gc: bool = False,
        loader: Callable[[Path], RetrievalModel] | None = None,
        snapshot_root: Path | None = None,
        update_log: UpdateLog | None = None,
    ) -> None:
        self.metrics = ServingMetrics()
        self.snapshot_root = Path(snapshot_root if snapshot_root is not None else Path(snapshot).parent).resolve()
        self._loader = loader or load_model
        self.limits = limits
        self.users = None if users is None else UserStore.read(Path(users))
        self.formulas = dict(value_formulas)
        self.update_log = update_log if update_log is not None else UpdateLog(None)
        self._applied_seq = self.update_log.last_seq  # the last update applied to the served model (model thread)
        self.model, self.info = self._load(Path(snapshot), self._applied_seq)
        self._updates = 0
        self._reloading = threading.Lock()
        self._writing = asyncio.Lock()  # binds to an event loop only while contended
        self.batcher = MicroBatcher(self._run_batch, batcher)
        self._publish_state()
        self._freeze_gc = freeze_gc
        if freeze_gc:
            gc.freeze()  # the model's objects live as long as it serves: keep them out of every GC pass

    # ---- request handling (event loop side) ----------------------------------------------------

    def query(
        self,
        user_id: int | None,
        history: Sequence[int] | None,
        actions: Sequence[int] | None,
        features: Mapping[str, int | str],
        **asks: Any,
    ) -> Query:
        """A request's :class:`Query`: the stored user's history and features (if ``user_id``),
        then the request's own events and features; a ValueError names what is out of bounds."""
        events, acts, feats = [], [], {}
        if user_id is not None:
            if self.users is None:
                raise LookupError("this server has no user store (start it with --users): send the history")
            events, acts, stored = self.users.get(user_id, self.model.config.max_history)
            feats = {f: v for f, v in stored.items() if f in self.model.config.features}  # those the model reads
        history = list(history or [])
        if len(history) > self.limits.max_history:  # the request's own events: the stored ones are bounded
            raise ValueError(f"a history of {len(history)} events is longer than the limit {self.limits.max_history}")
        if actions is not None and len(actions) != len(history):
            raise ValueError(f"{len(history)} history items but {len(actions)} actions")
        events, acts = events + history, acts + (list(actions) if actions is not None else [1] * len(history))
        feats |= {name: encode_feature(v) for name, v in features.items()}
        query = Query(events, acts, feats, **asks)
        self._check(query)
        return query

    def _check(self, q: Query) -> None:
        model = self.model
        max_k = self.limits.max_k or model.config.k0
        if not 1 <= q.k <= min(max_k, model.config.k0):
            raise ValueError(f"k must be in [1, {min(max_k, model.config.k0)}], got {q.k}")
        if q.filter is not None:
            if len(q.filter) > self.limits.max_filter_chars:
                raise ValueError(
                    f"the filter has {len(q.filter)} characters, more than the limit {self.limits.max_filter_chars}"
                )
            model.check_filter(q.filter)
        unknown = sorted(set(q.tasks or ()) - set(model.config.tasks))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; the model scores {list(model.config.tasks)}")
        if q.value is not None and q.value != "default" and q.value not in self.formulas:
            raise ValueError(f"unknown value formula {q.value!r}; this server has {['default', *self.formulas]}")
        if q.exclude_ids is not None and len(q.exclude_ids) > self.limits.max_history:
            raise ValueError(f"{len(q.exclude_ids)} excluded ids, more than the limit {self.limits.max_history}")
        if q.items is not None and not 1 <= len(q.items) <= self.limits.max_rank_items:
            raise ValueError(f"rank takes 1 to {self.limits.max_rank_items} items, got {len(q.items)}")

    async def retrieve(self, query: Query) -> dict:
        return await self.batcher.submit(("retrieve", query.value), query)

    async def rank(self, query: Query) -> dict:
        return await self.batcher.submit(("rank", query.value), query)

    async def update(self, update: Update) -> dict:
        """Apply an update on the model thread (committed to the update log first, if any); it is
        in every answer after this returns."""
        if len(update.ids) + len(update.deletes) > self.limits.max_update_items:
            raise ValueError(
                f"an update of {len(update.ids) + len(update.deletes)} items is larger than the limit "
                f"{self.limits.max_update_items}"
            )

        def apply(seq: int) -> dict:
            deleted = update.apply(self.model)  # a bad update raises before changing anything
            self._applied_seq = seq
            self._updates += 1
            self.metrics.updates.labels(op="upsert").inc(len(update.ids))
            self.metrics.updates.labels(op="delete").inc(deleted)
            self._publish_state()
            return {
                "upserted": len(update.ids),
                "deleted": deleted,
                **self.model.size()._asdict(),
            }

        async with self._writing:  # one write at a time: the log's order is the order applied
            seq = await asyncio.to_thread(self.update_log.append, update)  # durable first, off the model thread
            try:
                return await self.batcher.call(lambda: apply(seq))
            except Exception:  # refused, or never queued: not acknowledged, so not kept (a cancelled
                await asyncio.to_thread(self.update_log.discard, seq)  # call keeps its entry: the
                raise  # model thread may still apply it

    async def reload(self, path: Path | None) -> SnapshotInfo:
        """Swap in the snapshot at ``path`` (default: the current path again), or refuse it."""
        path = Path(path or self.info.path)
        if not path.resolve().is_relative_to(self.snapshot_root):
            raise OutsideSnapshotRoot(
                f"reload loads only snapshots under the snapshot root {self.snapshot_root} (--snapshot-root)"
            )
        with self._swapping():
            return await self._swap(path)

    async def compact(self) -> dict:
        """Write the served state (snapshot + live updates) as a new snapshot under the snapshot
        root, ``compacted-<seq>``, fold the update log into it and swap to it; what was done."""
        with self._swapping():
            through = self._applied_seq  # every update up to it is applied (and acknowledged)
            served = Path(self.info.path)
            try:
                if not await asyncio.to_thread(pending_updates, served, self.update_log, through):
                    return {"compacted": False, "snapshot": self.info.path, "seq": through}  # nothing to fold
                out = compacted_path(self.snapshot_root, through)
                await asyncio.to_thread(compact, served, self.update_log, out, through, self._loader)
            except (SnapshotError, ValueError, OSError) as e:
                self.metrics.reloads.labels(result="refused").inc()
                raise SnapshotError(f"compaction of {self.info.path} failed, it keeps serving: {e}") from None
            info = await self._swap(out)
            return {"compacted": True, "snapshot": info.path, "seq": through}

    @contextlib.contextmanager
    def _swapping(self) -> Iterator[None]:
        """One swap (reload or compaction) at a time; another one meanwhile is refused."""
        if not self._reloading.acquire(blocking=False):
            raise ReloadInProgress("a reload or compaction is already in progress")
        try:
            yield
        finally:
            self._reloading.release()

    async def _swap(self, path: Path) -> SnapshotInfo:
        """Load ``path`` with the updates applied so far, then switch to it between two batches."""
        seen = self._applied_seq
        try:
            model, info = await asyncio.to_thread(self._load, path, seen)
        except (SnapshotError, ValueError, OSError) as e:
            self.metrics.reloads.labels(result="refused").inc()
            raise SnapshotError(f"snapshot {path} refused, the old one keeps serving: {e}") from None

        def switch() -> SnapshotInfo:
            if self._applied_seq > seen:  # acknowledged while the new model was loading
                meanwhile = [u for _, u in self.update_log.entries(after=seen, through=self._applied_seq)]
                Update.merged(meanwhile).apply(model)
            self.model, self.info = model, info
            self._publish_state()
            if self._freeze_gc:
                gc.freeze()
            return info

        info = await self.batcher.call(switch)
        self.metrics.reloads.labels(result="swapped").inc()
        return info

    def describe(self) -> dict:
        """What ``GET /v1/snapshot`` answers."""
        model, info = self.model, self.info
        return {
            "path": info.path,
            "snapshot_root": str(self.snapshot_root),
            "version": info.version,
            "created_at": info.created_at,
            "loaded_at": info.loaded_at,
            **model.size()._asdict(),
            "dim": model.dim,
            "tasks": list(model.config.tasks),
            "features": list(model.config.features),
            "serving": model.config.to_json(),
            "value_formulas": {"default": model.config.value_formula, **self.formulas},
            "overarch": model.overarch is not None,
            "updates_applied": self._updates,
            "update_log": self._log_state(),
            "users": 0 if self.users is None else len(self.users),
        }

    def close(self) -> None:
        self.batcher.close()

    # ---- the model thread --------------------------------------------------------------------

    def _log_state(self) -> dict:
        base, base_seq = self.update_log.base
        return {
            "path": None if self.update_log.path is None else str(self.update_log.path),
            "durable": self.update_log.durable,
            "last_seq": self.update_log.last_seq,
            "applied_seq": self._applied_seq,
            "base": None if base is None else str(base),
            "base_seq": base_seq,
        }

    def _load(self, path: Path, through: int) -> tuple[RetrievalModel, SnapshotInfo]:
        """Load (checksums verified), apply the log's updates through ``through`` it does not
        hold, warm up. Any failure is an exception."""
        described_by = next((path / name for name in (MANIFEST, SHARDS_FILE) if (path / name).is_file()), None)
        manifest = described_by.read_bytes() if described_by is not None else b""
        model = self._loader(path)
        for formula in self.formulas.values():
            model.value_of(torch.zeros(1, len(model.config.tasks)), formula)  # a FormulaError names a bad one
        updates = pending_updates(path, self.update_log, through)
        if updates:
            try:
                Update.merged(updates).apply(model)
            except ValueError as e:
                raise ValueError(
                    f"{path} refuses the acknowledged updates of the update log {self.update_log.path} ({e}); serve "
                    "a snapshot they fit, or start with another --log (or --no-log) to serve it without them"
                ) from None
        model.recommend([], k=min(10, model.config.k0))  # warm-up: the first query compiles plans and kernels
        created = json.loads(manifest).get("created_at", "") if manifest else ""
        return model, SnapshotInfo(str(path), hashlib.sha256(manifest).hexdigest()[:16], str(created))

    def _publish_state(self) -> None:
        self.metrics.served(self.info.version, self.info.path, *self.model.size())

    def _formula(self, name: str | None) -> str | None:
        return None if name in (None, "default") else self.formulas[name]

    def _run_batch(self, key: tuple[str, str | None], queries: Sequence[Query], waited: Sequence[float]) -> list:
        """Answer a batch on the model thread: one result dict (or exception) per query."""
        kind, value = key
        model, version = self.model, self.info.version
        self.metrics.batch_size.observe(len(queries))
        for w in waited:
            self.metrics.stage.labels(stage="queue").observe(w)
        try:
            return self._answer(model, kind, self._formula(value), queries, waited, version)
        except ValueError:
            if len(queries) == 1:
                raise
        return [
            _outcome(lambda q=q, w=w: self._answer(model, kind, self._formula(value), [q], [w], version)[0])
            for q, w in zip(queries, waited)
        ]  # one bad request must not fail the others

    def _answer(
        self,
        model: RetrievalModel,
        kind: str,
        formula: str | None,
        queries: Sequence[Query],
        waited: Sequence[float],
        version: str,
    ) -> list[dict]:
        tasks = model.config.tasks
        if kind == "rank":  # requests rank different numbers of items: one call each
            out = []
            for b, q in enumerate(queries):
                scores = model.rank(model.inputs([q.history], [q.actions], [q.features]), torch.tensor([q.items]))[
                    0
                ]  # [M, T]
                value = model.value_of(scores, formula)
                bad = ~(torch.isfinite(value) & torch.isfinite(scores).all(-1))
                if bool(bad.any()):
                    raise ValueError(
                        f"the value formula gives no finite score (NaN or inf) for items "
                        f"{[q.items[i] for i in bad.nonzero()[:, 0].tolist()][:10]}"
                    )
                out.append(
                    {
                        "item_ids": q.items,
                        "scores": _floats(value),
                        "task_scores": _per_task(scores, tasks, q.tasks),
                        "snapshot": version,
                        "timing_ms": {"queue": 1e3 * waited[b]},
                    }
                )
            return out
        inputs = model.inputs([q.history for q in queries], [q.actions for q in queries], [q.features for q in queries])
        trace = Trace()
        exclude = [q.excluded() for q in queries]
        result = model(
            inputs,
            filter=[q.filter for q in queries],
            k=max(q.k for q in queries),
            value=formula,
            trace=trace,
            exclude=exclude if any(exclude) else None,
        )
        for stage in STAGES[1:]:
            self.metrics.stage.labels(stage=stage).observe(trace.seconds.get(stage, 0.0))
        for c in trace.candidates.tolist():
            self.metrics.candidates.observe(c)
        stages = {s: 1e3 * t for s, t in trace.seconds.items()}
        out = []
        for b, q in enumerate(queries):
            found = int((result.ids[b, : q.k] != -1).sum())  # -1 pads; other negative ids are items
            out.append(
                {
                    "ids": result.ids[b, :found].tolist(),
                    "scores": _floats(result.scores[b, :found]),
                    "task_scores": _per_task(result.task_scores[b, :found], tasks, q.tasks),
                    "snapshot": version,
                    "timing_ms": {"queue": 1e3 * waited[b], **stages, "batch_size": len(queries)},
                }
            )
        return out


def _per_task(scores: torch.Tensor, tasks: Sequence[str], wanted: Sequence[str] | None) -> dict[str, list[float]]:
    """``scores [M, T]`` as {task: [M]}, for the ``wanted`` tasks (default all)."""
    return {t: _floats(scores[:, tasks.index(t)]) for t in (wanted or tasks)}


def _floats(values: torch.Tensor) -> list[float | None]:
    """JSON numbers; a non-finite score (a Value Model formula may give one) is null."""
    return [v if math.isfinite(v) else None for v in values.tolist()]


def _outcome(fn):
    try:
        return fn()
    except ValueError as e:
        return e
