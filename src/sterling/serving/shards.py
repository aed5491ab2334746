"""Item-sharded serving: split a snapshot by items, search the shards, merge their top-K0.

A sharded snapshot is a directory of N complete snapshots, ``shard-0`` … ``shard-{N-1}``, plus
``shards.json``. Shard ``s`` holds the items with ``item_id mod N == s`` (:func:`shard_of`): its
part of the index (:meth:`~sterling.index.item_index.ItemIndex.shard`: the same centroids, lists
and int8 codes, so a shard's search is the whole index's restricted to its items) and of the
embedding cache, and a copy of the model weights (user tower, task queries, OverArch), so each shard
loads as an ordinary :class:`~sterling.retrieval.model.RetrievalModel`.

One query, fanned out (:class:`ShardedModel`; the shards are local models or Ray Serve
deployments, :mod:`sterling.serving.ray_app`)::

    history item ids → the ingress's copy of every item's cached embedding            [L, D]
    user tower + task queries (once, at the ingress)                                  [B, T, D]
    every shard: filtered top-K0 per task query, with each candidate's item state      [B·T, K0] per shard
    merge_topk: the global top-K0 per task query                                      [B·T, K0]
    OverArch + Value Model + top-k over the merged candidates (the single model's code)

The ingress gathers the first ``D`` cache columns of every shard once at load (:class:`HistoryTable`,
fp16, ``N × D``: 128 MB at a million items of width 64) and keeps them current through upserts, so
a request costs one round trip to the shards, not two. Each shard returns K0 candidates that pass
the filter (its own widening), so a selective filter
cannot starve the merge. With every list probed the result is the single-process model's exactly
(``tests/serving/test_shards.py``); with fewer probes each shard plans its own (from its own
selectivity estimate) and the two may differ, usually by the sharded one probing more.

A shard may have several replicas (copies of one shard snapshot, each a :class:`ShardSearcher`).
A read (search, item states, sizes) goes to one replica of each shard, each read to the next one;
an update goes to every replica of the shards it touches, and is answered once all have applied
it. Each shard's updates are numbered 1, 2, … in the order the ingress applies them (its
*sequence numbers*, counted from the model's load), and the ingress keeps them:

    replica: applies update ``seq`` only if it has applied 1 … seq - 1 (one already applied is
             skipped; a gap is answered ``Behind(applied_seq)``, nothing applied)
    read:    carries the shard's last sequence number; a replica that has not applied that far
             (Ray restarted it: it reloaded its snapshot) answers ``Behind(applied_seq)`` instead
    ingress: on ``Behind(a)``, sends that replica the shard's updates a + 1 … in one call, then asks
             again (at most :attr:`ShardedModel.MAX_CATCH_UPS` times, then a RuntimeError)

So a request sent after an update's answer is answered by replicas that hold the update
(read-your-writes by sequence number), whichever replica answers it. The ingress keeps every update
since the model loaded (a restarted replica may need them all): its memory grows with the updates
until a reload or a compaction swaps in a new model, which numbers its own from 1.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sterling.index.id_map import IdMap
from sterling.retrieval.inputs import UserInputs, check_item_ids, parse_inputs
from sterling.retrieval.model import RetrievalModel
from sterling.retrieval.publish import load_model, rewrite_snapshot
from sterling.retrieval.rank import Candidates, Retrieved, Trace
from sterling.retrieval.served import ItemCount
from sterling.snapshot import MANIFEST, SnapshotError, read_snapshot

__all__ = [
    "Behind",
    "Candidates",
    "LocalReplica",
    "ShardSearcher",
    "ShardedModel",
    "merge_topk",
    "shard_digests",
    "shard_of",
    "shard_paths",
    "split_snapshot",
]

SHARDS_FILE = "shards.json"


def shard_of(ids: torch.Tensor, shards: int) -> torch.Tensor:
    """int64 ``[...]``: the shard of each item id (``id mod shards``, non-negative)."""
    return torch.remainder(torch.as_tensor(ids, dtype=torch.int64), shards)


def _shards_file(path: Path) -> dict:
    try:
        described = json.loads((Path(path) / SHARDS_FILE).read_text())
        count, manifests = int(described["shards"]), described["manifests_sha256"]
        if count < 1 or len(manifests) != count:
            raise ValueError(f"{count} shards and {len(manifests)} manifest digests")
        return described
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SnapshotError(f"{path}: not a sharded snapshot ({SHARDS_FILE}: {e})") from None


def shard_paths(path: Path) -> list[Path]:
    """The shard snapshot directories of a sharded snapshot (``shards.json`` names how many)."""
    return [Path(path) / f"shard-{s}" for s in range(_shards_file(path)["shards"])]


def shard_digests(path: Path) -> list[str]:
    """The sha256 of each shard's manifest, as ``shards.json`` records them."""
    return list(_shards_file(path)["manifests_sha256"])


def split_snapshot(src: Path, out: Path, shards: int) -> Path:
    """Write the sharded snapshot of the published snapshot ``src`` (compacted) to ``out``."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, not {shards}")
    snap = read_snapshot(Path(src))
    model = load_model(Path(src))
    index, cache = model.index, snap.tensors["cache"]["state"]
    owner = shard_of(index.ids, shards)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        keep = owner == s
        shard = {"shard": {"index": s, "shards": shards, "source": str(src)}}
        rewrite_snapshot(snap, out / f"shard-{s}", index.shard(keep), cache[keep], shard)
    manifests = [hashlib.sha256((out / f"shard-{s}" / MANIFEST).read_bytes()).hexdigest() for s in range(shards)]
    (out / SHARDS_FILE).write_text(
        json.dumps({"shards": shards, "rule": "item_id mod shards", "manifests_sha256": manifests}) + "\n"
    )
    return out


def merge_topk(parts: Sequence[Candidates], k: int) -> Candidates:
    """The top-``k`` of each query over the shards' candidates, by score (ties: shard order, then
    rank within the shard). Pure: the shards' lists in, the merged list out."""
    ids = torch.cat([p.ids for p in parts], 1)  # [Q, N·K0]
    scores = torch.cat([p.scores for p in parts], 1)
    state = torch.cat([p.state for p in parts], 1)  # [Q, N·K0, S]
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]  # [Q, k]
    return Candidates(
        ids.gather(1, order), scores.gather(1, order), state.gather(1, order[..., None].expand(-1, -1, state.shape[2]))
    )


class ShardSearcher:
    """The shard side, one replica: a :class:`RetrievalModel` over the shard's items answers for
    them, reading (:meth:`read`) and updating (:meth:`apply`) by the shard's sequence numbers."""

    def __init__(self, model: RetrievalModel) -> None:
        self.model = model
        self.applied_seq = 0  # this shard's updates 1 … applied_seq are applied (since the snapshot loaded)

    @classmethod
    def load(cls, path: Path, digest: str | None = None) -> ShardSearcher:
        """The shard snapshot at ``path`` (checksums verified); ``digest``: the sha256 its
        manifest must have (``shards.json``'s), so a shard swapped under a sharded snapshot is refused."""
        if digest is not None:
            found = hashlib.sha256((Path(path) / MANIFEST).read_bytes()).hexdigest()
            if found != digest:
                raise SnapshotError(
                    f"{path}: its manifest's sha256 {found[:16]}… is not the {digest[:16]}… of "
                    f"{SHARDS_FILE}; the shards are not one snapshot"
                )
        return cls(load_model(Path(path)))

    @torch.no_grad()
    def history_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every item's external id ``int64 [n]`` (distinct) and the cached embedding a history
        reads for it (its newest row; cache dtype ``[n, D]``)."""
        index = self.model.index
        ids = index.ids
        return ids, index.table_rows(index.rows_of(ids)[0], self.model.dim)

    def search(
        self, queries: torch.Tensor, filters: list[str | None], exclude: list[Sequence[int]] | None = None
    ) -> Candidates:
        """This shard's filtered top-K0 of the task queries ``[Q, D]`` (``exclude``: per query, ids
        not to return; those of other shards are ignored), with their item state."""
        return self.model.search(queries, filters, exclude)

    @torch.no_grad()
    def states(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bool ``[M]`` (the shard holds the id) and float32 ``[M, S]`` item states (0 elsewhere)."""
        rows, found = self.model.index.rows_of(torch.as_tensor(ids, dtype=torch.int64))
        return found, self.model.items.states_of(rows)

    def size(self) -> ItemCount:
        """Live items and fresh (upserted, not yet compacted) items."""
        return self.model.size()

    def apply(self, first: int, updates: Sequence[tuple[str, tuple]]) -> list | Behind:
        """Apply this shard's updates ``first``, ``first + 1``, … in order, each ``(method, args)``
        (``"upsert"``: ids ``int64 [M]``, embeddings ``float32 [M, D]``, M attribute dicts;
        ``"delete"``: ids ``int64 [M]``), skipping those already applied. Returns the results of
        those applied now (a delete's: how many live items went), or :class:`Behind` (nothing
        applied) when an update before ``first`` is missing."""
        if first > self.applied_seq + 1:
            return Behind(self.applied_seq)
        results = []
        for seq, (method, args) in enumerate(updates, first):
            if seq > self.applied_seq:
                results.append(getattr(self.model, method)(*args))  # a refused update raises, not applied
                self.applied_seq = seq
        return results

    def read(self, seq: int, method: str, *args) -> object:
        """``self.<method>(*args)`` (:meth:`search`, :meth:`states`, :meth:`size`,
        :meth:`history_table`) once this shard's updates 1 … ``seq`` are applied; until then
        :class:`Behind`, so no answer comes from a state older than the caller's."""
        if self.applied_seq < seq:
            return Behind(self.applied_seq)
        return getattr(self, method)(*args)


@dataclass(frozen=True)
class Behind:
    """A replica's answer when it lacks updates the call needs: it has applied its shard's updates
    1 … ``applied_seq`` (0: none since its snapshot loaded)."""

    applied_seq: int


@dataclass(frozen=True)
class _Pending:
    """A local call, made when its result is asked for (as a Ray Serve response is awaited, and
    with its exception raised there)."""

    run: Callable[[], object]

    def result(self) -> object:
        return self.run()


class LocalReplica:
    """A shard replica in this process: ``replica(method, *args)`` → a pending result whose
    ``.result()`` is ``searcher.<method>(*args)``, as a Ray Serve handle's. Replacing ``searcher``
    with a freshly loaded one is what a restart does to a Ray Serve replica."""

    def __init__(self, searcher: ShardSearcher) -> None:
        self.searcher = searcher

    def __call__(self, method: str, *args) -> _Pending:
        return _Pending(lambda: getattr(self.searcher, method)(*args))


class HistoryTable:
    """The cached embeddings of every item, by external id, at the ingress (what histories read):
    the shards' rows at load, sorted by id, and the rows upserted since, beside them (a few
    thousand at most before they are merged in, so an upsert does not re-sort a million rows).

    Args:
        ids (torch.Tensor): int64 ``[N]`` unique ids.
        vectors (torch.Tensor): ``[N, D]`` (the cache's dtype) their embeddings.
    """

    MERGE_AT = 4096

    def __init__(self, ids: torch.Tensor, vectors: torch.Tensor) -> None:
        self.main = (IdMap.build(ids), vectors)
        self.fresh = (IdMap.build(ids[:0]), vectors[:0])

    def vectors_of(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 ``[L, D]`` of ``ids`` ``[L]`` (an upserted row over the loaded one); a
        ValueError names unknown ids."""
        (main_map, main_vectors), (fresh_map, fresh_vectors) = self.main, self.fresh
        rows, found = main_map.lookup(ids)
        fresh_rows, fresh_found = fresh_map.lookup(ids)
        if not bool((found | fresh_found).all()):
            raise ValueError(
                f"unknown item ids {ids[~(found | fresh_found)].unique()[:10].tolist()} (not in the index)"
            )
        out = main_vectors[rows.clamp(min=0)].float()
        if not len(fresh_map):
            return out
        return torch.where(fresh_found[:, None], fresh_vectors[fresh_rows.clamp(min=0)].float(), out)

    def upsert(self, ids: torch.Tensor, embeddings: torch.Tensor) -> None:
        """Set (or add) the rows of ``ids``, as a shard's cache stores them (rounded to its dtype)."""
        fresh_map, fresh_vectors = self.fresh
        rows = torch.arange(len(fresh_vectors), len(fresh_vectors) + len(ids))
        fresh_vectors = torch.cat([fresh_vectors, embeddings.to(fresh_vectors.dtype)])
        fresh_map = IdMap.build(torch.cat([fresh_map.sorted_ids, ids]), torch.cat([fresh_map.rows, rows]))
        self.fresh = (fresh_map, fresh_vectors)
        if len(fresh_vectors) >= self.MERGE_AT:
            main_map, main_vectors = self.main
            merged = IdMap.build(
                torch.cat([main_map.sorted_ids, fresh_map.sorted_ids]),
                torch.cat([main_map.rows, len(main_vectors) + fresh_map.rows]),
            )
            vectors = torch.cat([main_vectors, fresh_vectors])[merged.rows]  # each id's current row only
            self.main = (IdMap(merged.sorted_ids, torch.arange(len(merged))), vectors)
            self.fresh = (IdMap.build(ids[:0]), fresh_vectors[:0])


class ShardedModel:
    """The ingress: user tower, task queries, OverArch and Value Model over shards.

    Reads go to one replica of each shard (each read to the next replica), updates to every replica
    of the shards they touch, numbered per shard (the module's docstring: the protocol). Its
    methods are called from one thread at a time, in order (the model thread).

    Args:
        head (RetrievalModel): a shard's model, whose weights and config the ingress uses (its
            index and cache are not read).
        shards (Sequence[Sequence[Callable]]): per shard, its replicas, each ``call(method, *args)``
            → a pending result whose ``.result()`` is ``ShardSearcher.<method>(*args)`` (a
            :class:`LocalReplica`, or a Ray Serve handle's response): all the replicas a step
            asks are called before any result is awaited.
    """

    MAX_CATCH_UPS = 3  # catch-ups of one replica for one call before it is an error

    def __init__(self, head: RetrievalModel, shards: Sequence[Sequence[Callable]]) -> None:
        if head.ranker is not None:
            raise ValueError(
                "a model with a request-level ranker is not served by shards yet (the ingress keeps the "
                "history's retrieval embeddings only): serve it whole, or load it with use_ranker=False"
            )
        self.shards = [list(replicas) for replicas in shards]
        if not all(self.shards):
            raise ValueError("every shard needs at least one replica")
        self.head, self.config = head, head.config
        self.meta, self.overarch, self.dim = head.meta, head.overarch, head.dim
        # per shard, the updates applied since this model was built: (method, args) of seq 1, 2, …
        self._updates: list[list[tuple[str, tuple]]] = [[] for _ in self.shards]
        self._turn = 0  # reads so far: read t goes to replica t mod R of each shard
        warming = [call("read", 0, "size") for replicas in self.shards for call in replicas[1:]]
        tables = self._read("history_table")  # the first read: replica 0 of each shard, as the others load
        for pending in warming:
            pending.result()  # every replica has loaded its shard: none loads on a request
        self.history = HistoryTable(torch.cat([i for i, _ in tables]), torch.cat([v for _, v in tables]))
        self._size = self._count()

    @classmethod
    def local(cls, path: Path, replicas: int = 1) -> ShardedModel:
        """All shards of the sharded snapshot ``path`` in this process, ``replicas`` copies of each
        (tests, one machine)."""
        shards = [
            [LocalReplica(ShardSearcher.load(p, d)) for _ in range(replicas)]
            for p, d in zip(shard_paths(path), shard_digests(path))
        ]
        return cls(shards[0][0].searcher.model, shards)

    def _read(self, method: str, *args) -> list:
        """Per shard, ``ShardSearcher.<method>(*args)`` from one of its replicas, answered once that
        replica has applied every update of its shard this model has applied."""
        turn, self._turn = self._turn, self._turn + 1
        chosen = [replicas[turn % len(replicas)] for replicas in self.shards]
        requests = [("read", len(updates), method, *args) for updates in self._updates]
        pending = [call(*request) for call, request in zip(chosen, requests)]
        return [
            self._settled(s, call, p, request, len(self._updates[s]))
            for s, (call, p, request) in enumerate(zip(chosen, pending, requests))
        ]

    def _settled(self, shard: int, call: Callable, pending, request: tuple, needs: int) -> object:
        """The answer to ``request``, sent to a replica of ``shard`` (``call``; ``pending``: its
        response). A replica that answers :class:`Behind` is sent the shard's updates it lacks,
        up to ``needs``, in order in one call, and asked again."""
        answer = pending.result()
        for _ in range(self.MAX_CATCH_UPS):
            if not isinstance(answer, Behind):
                return answer
            call("apply", answer.applied_seq + 1, self._updates[shard][answer.applied_seq : needs]).result()
            answer = call(*request).result()
        if isinstance(answer, Behind):
            raise RuntimeError(
                f"a replica of shard {shard} has applied its updates 1 … {answer.applied_seq}, not 1 … {needs}, "
                f"after {self.MAX_CATCH_UPS} catch-ups (is it restarting over and over?)"
            )
        return answer

    def _update(self, parts: dict[int, tuple[str, tuple]]) -> dict[int, list[list]]:
        """Apply ``parts[s]`` (``(method, args)``) to every replica of shard ``s`` as the shard's next
        update; returns per shard each replica's :meth:`ShardSearcher.apply` result, once every
        replica has applied it. A replica whose call fails (an exception) while another replica of
        its shard applied the update is asked once more (caught up first if Ray restarted it); a
        shard whose replicas all refuse the update does not count it. Then the first exception, if
        any is left, is raised."""
        sent = []
        for s, update in parts.items():
            self._updates[s].append(update)
            request = ("apply", len(self._updates[s]), [update])
            sent += [(s, call, call(*request), request) for call in self.shards[s]]
        applied: dict[int, list[list]] = {s: [] for s in parts}
        failed: list[tuple[int, Callable, tuple, Exception]] = []
        for s, call, pending, request in sent:
            try:
                applied[s].append(self._settled(s, call, pending, request, request[1] - 1))
            except Exception as e:  # once every replica has answered: asked again, or raised
                failed.append((s, call, request, e))
        refused: list[Exception] = []
        for s, call, request, e in failed:
            if applied[s]:  # a replica of the shard took it: this one failed on the way, not on the update
                try:
                    applied[s].append(self._settled(s, call, call(*request), request, request[1] - 1))
                    continue
                except Exception as again:
                    e = again
            refused.append(e)
        for s in parts:
            if not applied[s]:
                self._updates[s].pop()  # no replica holds it
        if refused:
            raise refused[0]
        return applied

    def _states(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 ``[M, S]``: the item state of ``ids`` ``[M]``, each from its shard."""
        parts = self._read("states", ids)
        found = torch.stack([f for f, _ in parts]).any(0)
        if not bool(found.all()):
            raise ValueError(f"unknown item ids {ids[~found].unique()[:10].tolist()} (not in the index)")
        return torch.stack([v for _, v in parts]).sum(0)  # each id is found on one shard, zeros elsewhere

    def size(self) -> ItemCount:
        """Live items and fresh items, over the shards (counted at load and after each update,
        so that asking never waits on the shards)."""
        return self._size

    def _count(self) -> ItemCount:
        sizes = self._read("size")
        return ItemCount(sum(n for n, _ in sizes), sum(f for _, f in sizes))

    def check_filter(self, expr: str) -> None:
        """A FilterError names a malformed filter (checked here: every shard's index knows the
        same features, :meth:`ItemIndex.shard`)."""
        self.head.check_filter(expr)

    def value_of(self, task_scores: torch.Tensor, value: str | None = None) -> torch.Tensor:
        return self.head.value_of(task_scores, value)

    def inputs(self, histories: Sequence[Sequence[int]], actions=None, features=None) -> UserInputs:
        """:meth:`RetrievalModel.inputs`, with the history's embeddings gathered from the shards."""
        ids, inputs = parse_inputs(self.config, histories, actions, features)
        return replace(inputs, history_vectors=self.history.vectors_of(ids))

    def forward(
        self,
        inputs: UserInputs,
        filter: str | Sequence[str | None] | None = None,
        k: int = 100,
        value: str | None = None,
        trace: Trace | None = None,
        exclude: Sequence[Sequence[int]] | None = None,
    ) -> Retrieved:
        """:meth:`RetrievalModel.forward` over the shards: the same answer with every list probed."""
        return self.head.retrieve(inputs, self._search, filter, k, value, trace, exclude)

    def _search(
        self, queries: torch.Tensor, filters: list[str | None], exclude: list[Sequence[int]] | None = None
    ) -> Candidates:
        return merge_topk(self._read("search", queries, filters, exclude), self.config.k0)

    __call__ = forward

    recommend = RetrievalModel.recommend  # the same one-user call over this model's inputs and forward

    @torch.no_grad()
    def rank(self, inputs: UserInputs, item_ids: torch.Tensor) -> torch.Tensor:
        """:meth:`RetrievalModel.rank`: per-task scores ``[B, M, T]`` of given items ``[B, M]``."""
        item_ids = check_item_ids(item_ids, inputs.batch_size)
        state = self._states(item_ids.reshape(-1))
        if inputs.batch_size == 0:
            return torch.zeros(0, item_ids.shape[1], len(self.config.tasks))
        users, queries = self.head.encode(inputs)
        return self.head.task_scores_of(inputs, users, queries, state.view(*item_ids.shape, -1))

    def embed_items(self, attributes: Sequence[dict]) -> torch.Tensor:
        """:meth:`RetrievalModel.embed_items`, at the ingress (every shard carries the same item tower)."""
        return self.head.embed_items(attributes)

    def upsert(
        self,
        ids: torch.Tensor | Sequence[int],
        embeddings: torch.Tensor | None = None,
        attributes: Sequence[dict] = (),
    ) -> None:
        """Each item to its shard (``shard_of``), where every replica's model adds it; ``embeddings``
        None: the item tower embeds them here first (:meth:`embed_items`). The arguments'
        shapes, ids and values are checked here first, so a bad one changes no shard (a shard may
        still refuse an attribute its store cannot hold, after the others took theirs)."""
        ids = torch.as_tensor(ids, dtype=torch.int64)
        if embeddings is None:
            embeddings = self.embed_items(attributes)
        embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
        if ids.dim() != 1 or embeddings.shape != (len(ids), self.dim) or len(attributes) != len(ids):
            raise ValueError(
                f"upsert takes ids [M], embeddings [M, {self.dim}] and M attribute dicts; got "
                f"{list(ids.shape)}, {list(embeddings.shape)} and {len(attributes)}"
            )
        if len(ids.unique()) != len(ids) or bool((ids == -1).any()):
            raise ValueError("upserted ids must be distinct and not -1 (which marks an empty slot)")
        if not bool(torch.isfinite(embeddings).all()):
            raise ValueError("upserted embeddings must be finite")
        owner = shard_of(ids, len(self.shards))
        parts = {}
        for s in owner.unique().tolist():
            mine = torch.nonzero(owner == s).view(-1)
            parts[s] = ("upsert", (ids[mine], embeddings[mine], [attributes[i] for i in mine.tolist()]))
        self._update(parts)
        self.history.upsert(ids, torch.as_tensor(embeddings)[:, : self.dim])
        self._size = self._count()

    def delete(self, ids: torch.Tensor | Sequence[int]) -> int:
        """Delete ``ids`` on every replica of their shards; returns how many live items went (the
        replicas of a shard apply the same updates in the same order, so they agree; a
        RuntimeError if they do not)."""
        ids = torch.as_tensor(ids, dtype=torch.int64)
        owner = shard_of(ids, len(self.shards))
        removed = 0
        for s, answers in self._update({s: ("delete", (ids[owner == s],)) for s in owner.unique().tolist()}).items():
            counts = {n for applied in answers for n in applied}
            if len(counts) != 1:
                raise RuntimeError(f"the replicas of shard {s} deleted {sorted(counts)} items each: they have diverged")
            removed += counts.pop()
        self._size = self._count()
        return removed
