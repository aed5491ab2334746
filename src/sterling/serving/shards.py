"""Item-sharded serving: split a snapshot by items, search the shards, merge their top-K0.

A sharded snapshot is a directory of N complete snapshots, ``shard-0`` … ``shard-{N-1}``, plus
``shards.json``. Shard ``s`` holds the items with ``item_id mod N == s`` (:func:`shard_of`): its
part of the index (:meth:`~sterling.index.item_index.ItemIndex.shard`: the same centroids, lists
and int8 codes, so a shard's search is the whole index's restricted to its items) and of the
embedding cache, and a copy of the model weights (user tower, task queries, OverArch), so each shard
loads as an ordinary :class:`~sterling.serving.model.RetrievalModel`.

One query, fanned out (:class:`ShardedModel`; the shards are local models or Ray Serve
deployments, :mod:`sterling.serving.ray_app`)::

    history item ids         → every shard: the cached embeddings of those it holds    [L, D]
    user tower + task queries (once, at the ingress)                                  [B, T, D]
    every shard: filtered top-K0 per task query, with each candidate's item state      [B·T, K0] per shard
    merge_topk: the global top-K0 per task query                                      [B·T, K0]
    OverArch + Value Model + top-k over the merged candidates (the single model's code)

Each shard returns K0 candidates that pass the filter (its own widening), so a selective filter
cannot starve the merge. With every list probed the result is the single-process model's exactly
(``tests/serving/test_shards.py``); with fewer probes each shard plans its own (from its own
selectivity estimate) and the two may differ, usually by the sharded one probing more.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sterling.serving.model import RetrievalModel, Retrieved, Trace, UserInputs, check_k, parse_inputs, per_query
from sterling.serving.publish import load_model
from sterling.serving.snapshot import SnapshotError, read_snapshot, write_snapshot

__all__ = ["Candidates", "ShardedModel", "merge_topk", "shard_of", "split_snapshot"]

SHARDS_FILE = "shards.json"


def shard_of(ids: torch.Tensor, shards: int) -> torch.Tensor:
    """int64 ``[...]``: the shard of each item id (``id mod shards``, non-negative)."""
    return torch.remainder(torch.as_tensor(ids, dtype=torch.int64), shards)


def shard_paths(path: Path) -> list[Path]:
    """The shard snapshot directories of a sharded snapshot (``shards.json`` names how many)."""
    try:
        count = json.loads((Path(path) / SHARDS_FILE).read_text())["shards"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SnapshotError(f"{path}: not a sharded snapshot ({SHARDS_FILE}: {e})") from None
    return [Path(path) / f"shard-{s}" for s in range(int(count))]


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
        index_meta, index_tensors = index.shard(keep).to_snapshot_parts()
        meta = {**snap.meta, "index": index_meta, "shard": {"index": s, "shards": shards, "source": str(src)}}
        files = {"index": index_tensors, "cache": {"state": cache[keep].contiguous()}, "model": snap.tensors["model"]}
        write_snapshot(out / f"shard-{s}", files, meta)
    (out / SHARDS_FILE).write_text(json.dumps({"shards": shards, "rule": "item_id mod shards"}) + "\n")
    return out


@dataclass(frozen=True)
class Candidates:
    """A shard's (or the merged) top-K0 of ``Q`` task queries.

    Args:
        ids (torch.Tensor): int64 ``[Q, K0]``, -1 where fewer pass.
        scores (torch.Tensor): float32 ``[Q, K0]``, descending, -inf where ids is -1.
        state (torch.Tensor): float32 ``[Q, K0, S]``, each candidate's item state (what the
            model's OverArch, or without one its inner products, read).
    """

    ids: torch.Tensor
    scores: torch.Tensor
    state: torch.Tensor


def merge_topk(parts: Sequence[Candidates], k: int) -> Candidates:
    """The top-``k`` of each query over the shards' candidates, by score (ties: shard order, then
    rank within the shard). Pure: the shards' lists in, the merged list out."""
    ids = torch.cat([p.ids for p in parts], 1)                                    # [Q, N·K0]
    scores = torch.cat([p.scores for p in parts], 1)
    state = torch.cat([p.state for p in parts], 1)                                # [Q, N·K0, S]
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]  # [Q, k]
    return Candidates(ids.gather(1, order), scores.gather(1, order),
                      state.gather(1, order[..., None].expand(-1, -1, state.shape[2])))


class ShardSearcher:
    """The shard side: a :class:`RetrievalModel` over the shard's items answers for them."""

    def __init__(self, model: RetrievalModel) -> None:
        self.model = model

    @classmethod
    def load(cls, path: Path) -> ShardSearcher:
        return cls(load_model(Path(path)))

    @torch.no_grad()
    def embeddings(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bool ``[L]`` (the shard holds the id) and float32 ``[L, D]`` cached embeddings (0 elsewhere)."""
        rows, found = self.model.lookup(torch.as_tensor(ids, dtype=torch.int64))
        return found, self.model.history_vectors(rows.clamp(min=0)) * found[:, None]

    @torch.no_grad()
    def search(self, queries: torch.Tensor, filters: list[str | None]) -> Candidates:
        """This shard's filtered top-K0 of the task queries ``[Q, D]``, with their item state."""
        model = self.model
        found = model.index.search(queries, k=model.config.k0, filter=filters, nprobe=model.config.nprobe)
        rows, _ = model.lookup(found.ids)
        return Candidates(found.ids, found.scores, model.candidate_state(rows.clamp(min=0)))

    def check_filter(self, expr: str) -> None:
        self.model.check_filter(expr)


class ShardedModel:
    """The ingress: user tower, task queries, OverArch and Value Model over shards.

    Args:
        head (RetrievalModel): a shard's model, whose weights and config the ingress uses (its
            index and cache are not read).
        shards (Sequence[Callable]): per shard, ``call(method, *args)`` → the result of
            ``ShardSearcher.<method>(*args)`` (a local call, or a Ray Serve handle's).
    """

    def __init__(self, head: RetrievalModel, shards: Sequence[Callable]) -> None:
        self.head, self.shards, self.config = head, list(shards), head.config
        self.meta = head.meta

    @classmethod
    def local(cls, path: Path) -> ShardedModel:
        """All shards of the sharded snapshot ``path`` in this process (tests, one machine)."""
        searchers = [ShardSearcher.load(p) for p in shard_paths(path)]
        return cls(searchers[0].model, [_local_call(s) for s in searchers])

    def _fan_out(self, method: str, *args) -> list:
        return [call(method, *args) for call in self.shards]

    def check_filter(self, expr: str) -> None:
        self.shards[0]("check_filter", expr)

    def inputs(self, histories: Sequence[Sequence[int]], actions=None, features=None) -> UserInputs:
        """:meth:`RetrievalModel.inputs`, with the history's embeddings gathered from the shards."""
        ids, inputs = parse_inputs(self.config, histories, actions, features)
        parts = self._fan_out("embeddings", ids)
        found = torch.stack([f for f, _ in parts]).any(0)
        if not bool(found.all()):
            raise ValueError(f"unknown item ids {ids[~found].unique()[:10].tolist()} (not in the index)")
        return replace(inputs, history_vectors=torch.stack([v for _, v in parts]).sum(0))

    @torch.no_grad()
    def forward(self, inputs: UserInputs, filter: str | Sequence[str | None] | None = None, k: int = 100,
                value: str | None = None, trace: Trace | None = None) -> Retrieved:
        """:meth:`RetrievalModel.forward` over the shards: the same answer with every list probed."""
        head = self.head
        check_k(k, self.config.k0)
        if inputs.batch_size == 0:
            return head.empty_answer(k)
        trace = trace or Trace()
        with trace.stage("user_tower"):
            users, queries = head.encode(inputs)
        b, t, d = queries.shape
        with trace.stage("filter"):
            filters = per_query(filter, b, t)
            for expr in set(filters) - {None}:
                self.check_filter(expr)
        with trace.stage("ann"):
            merged = merge_topk(self._fan_out("search", queries.reshape(b * t, d), filters), self.config.k0)
        return head.score_candidates(inputs, users, queries, merged.ids.view(b, t, -1),
                                     merged.state.view(b, t, merged.ids.shape[1], -1), k, value, trace)

    __call__ = forward


def _local_call(searcher: ShardSearcher) -> Callable:
    def call(method: str, *args):
        return getattr(searcher, method)(*args)
    return call
