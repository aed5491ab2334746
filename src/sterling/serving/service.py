"""The serving state behind the HTTP API: the current model, its snapshot, live updates and swaps.

Every use of the model runs on the micro-batcher's one thread (:mod:`sterling.serving.batcher`):
retrieve and rank requests in batches, item updates and the final step of a swap alone and in
arrival order. So an acknowledged update is in every later answer, and a swap lands between two
batches: requests in flight finish on the old model.

A swap (:meth:`Service.reload`) loads the new snapshot on another thread (checksums verified),
applies the live updates acknowledged so far, answers a warm-up request, and only then hands the
model thread a short step that applies the updates acknowledged meanwhile and switches. A snapshot
that fails any of this is refused and the old model keeps serving. Updates are kept (the
*update log*, merged into each id's last operation whenever it reaches 1,024 updates, so it holds
at most one entry per item touched) and applied to every snapshot swapped in: none is lost by a swap.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sterling.retrieval.model import RetrievalModel
from sterling.retrieval.publish import load_model
from sterling.retrieval.rank import Trace
from sterling.serving.batcher import BatcherConfig, MicroBatcher
from sterling.serving.metrics import STAGES, ServingMetrics
from sterling.serving.shards import SHARDS_FILE
from sterling.serving.users import UserStore, encode_feature
from sterling.snapshot import MANIFEST, SnapshotError

if TYPE_CHECKING:
    from sterling.serving.update_log import UpdateLog

__all__ = ["Limits", "OutsideSnapshotRoot", "Query", "ReloadInProgress", "Service", "SnapshotInfo", "Update"]

log = logging.getLogger("sterling.serving")

_MERGE_LOG_AT = 1024  # updates in the log before it is merged into one (each id's last operation)


class ReloadInProgress(RuntimeError):
    """A reload was asked for while another one runs."""


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
        list of floats or None (the model embeds the item); a ValueError if their lengths differ."""
        dims = {len(e) for e in embeddings if e is not None}
        if len(dims) > 1:
            raise ValueError(f"the embeddings have different lengths {sorted(dims)}")
        if all(e is not None for e in embeddings):
            vectors: torch.Tensor | list = torch.tensor(list(embeddings), dtype=torch.float32).view(
                len(embeddings), dims.pop() if dims else 0
            )
        else:  # those left out are embedded on the model thread, by the model that applies the update
            vectors = [None if e is None else torch.tensor(e, dtype=torch.float32) for e in embeddings]
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
        update_log (UpdateLog | None): the durable log of acknowledged updates
            (:mod:`sterling.serving.update_log`): its entries are applied to the first snapshot
            (those it refuses are skipped with a warning), and each update is committed to it
            before :meth:`update` returns. None: updates live in memory only.
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
        self.update_log = update_log
        self.model, self.info = self._load(Path(snapshot), [])
        self._log: list[Update] = []  # read and written on the model thread only
        self._updates = 0
        if update_log is not None:
            self._replay(update_log)
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

        def apply() -> dict:
            deleted = update.apply(self.model)  # a bad update raises before changing anything
            self._log.append(update)
            self._updates += 1
            if len(self._log) >= _MERGE_LOG_AT and not self._reloading.locked():
                self._log = [Update.merged(self._log)]  # bounded by the distinct items touched
            self.metrics.updates.labels(op="upsert").inc(len(update.ids))
            self.metrics.updates.labels(op="delete").inc(deleted)
            self._publish_state()
            return {
                "upserted": len(update.ids),
                "deleted": deleted,
                **self.model.size()._asdict(),
            }

        async with self._writing:  # one write at a time: the log's order is the order applied
            seq = None
            if self.update_log is not None:  # durable first, off the model thread (requests go on)
                seq = await asyncio.to_thread(self.update_log.append, update)
            try:
                return await self.batcher.call(apply)
            except Exception:  # refused, or never queued: not acknowledged, so not kept (a cancelled
                if seq is not None:  # call keeps its entry: the model thread may still apply it)
                    await asyncio.to_thread(self.update_log.discard, seq)
                raise

    async def reload(self, path: Path | None) -> SnapshotInfo:
        """Swap in the snapshot at ``path`` (default: the current path again), or refuse it."""
        path = Path(path or self.info.path)
        if not path.resolve().is_relative_to(self.snapshot_root):
            raise OutsideSnapshotRoot(
                f"reload loads only snapshots under the snapshot root {self.snapshot_root} (--snapshot-root)"
            )
        if not self._reloading.acquire(blocking=False):
            raise ReloadInProgress("a reload is already in progress")
        try:
            pending = await self.batcher.call(lambda: list(self._log))  # not merged again until the swap ends
            seen = len(pending)
            try:
                model, info = await asyncio.to_thread(self._load, path, pending)
            except (SnapshotError, ValueError, OSError) as e:
                self.metrics.reloads.labels(result="refused").inc()
                raise SnapshotError(f"snapshot {path} refused, the old one keeps serving: {e}") from None

            def switch() -> SnapshotInfo:
                if len(self._log) > seen:  # acknowledged while the new model was loading
                    Update.merged(self._log[seen:]).apply(model)
                self.model, self.info = model, info
                self._publish_state()
                if self._freeze_gc:
                    gc.freeze()
                return info

            info = await self.batcher.call(switch)
            self.metrics.reloads.labels(result="swapped").inc()
            return info
        finally:
            self._reloading.release()

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
            "update_log": None
            if self.update_log is None
            else {"path": str(self.update_log.path), "last_seq": self.update_log.last_seq},
            "users": 0 if self.users is None else len(self.users),
        }

    def close(self) -> None:
        self.batcher.close()

    # ---- the model thread --------------------------------------------------------------------

    def _replay(self, update_log: UpdateLog) -> None:
        """Apply the log's entries to the model just loaded, in order (before the batcher serves)."""
        for seq, update in update_log.entries():
            try:
                update.apply(self.model)
            except ValueError as e:  # logged, then refused: it was never acknowledged
                log.warning("update %d of %s is refused by %s and skipped: %s", seq, update_log.path, self.info.path, e)
                continue
            self._log.append(update)
            self._updates += 1
        if len(self._log) > 1:
            self._log = [Update.merged(self._log)]

    def _load(self, path: Path, updates: Sequence[Update]) -> tuple[RetrievalModel, SnapshotInfo]:
        """Load (checksums verified), apply ``updates``, warm up; any failure is an exception."""
        described_by = next((path / name for name in (MANIFEST, SHARDS_FILE) if (path / name).is_file()), None)
        manifest = described_by.read_bytes() if described_by is not None else b""
        model = self._loader(path)
        for formula in self.formulas.values():
            model.value_of(torch.zeros(1, len(model.config.tasks)), formula)  # a FormulaError names a bad one
        if updates:
            Update.merged(updates).apply(model)
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
