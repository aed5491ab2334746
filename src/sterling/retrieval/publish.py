"""Publish a trained checkpoint as one snapshot, and load it back as a :class:`RetrievalModel`.

The publish flow of SilverTorch §1.4, on a laptop:

1. load the checkpoint: a two-tower model (optional OverArch) of ``sterling train``, or a next-item
   HSTU / SASRec retriever of ``sterling train --model hstu|sasrec``, whose encoder becomes the
   user tower (:mod:`sterling.models.sequence_tower`; the query ``next``, plus one per task of a
   ``--multi-task`` retriever; no OverArch);
2. **embedding evaluator**: the item tower encodes every item (the retriever: its item table); an
   item of the items file the checkpoint's catalogue does not hold is encoded *cold* (zero id
   embedding, its known attribute terms), as the served model embeds an item upserted without an
   embedding (:class:`~sterling.retrieval.item_table.ItemEncoder`, in the snapshot);
3. **index builder**: int8 codes + IVF (k-means) + Bloom index + exact attributes, in one item order;
4. **embedding cache**: per item, in the index's order, the item embedding (rounded to fp16 / bf16,
   what the user tower reads for histories; the index holds the tower's ``index_vectors`` of it,
   the embedding itself for the two-tower, L2-normalised for a retriever) and OverArch's item-side state (computed once here;
   ranking gathers it instead of re-running the item tower);
5. **composer**: user tower + task queries + OverArch + Value Model formula + index + cache (+ the
   two-tower's item tower over attributes, without its id table, for fresh items);
6. the snapshot: ``index.safetensors``, ``cache.safetensors``, ``model.safetensors`` and a manifest
   naming every config; optionally (``export=True``) ``program.pt2``, the ``torch.export`` program of
   the whole forward, and (``aot=True``) ``program.aoti.pt2``, its AOTInductor package
   (:mod:`sterling.retrieval.export`).

Steps 3-6 are :func:`write_model_snapshot`, which takes the towers and item embeddings themselves
(e.g. the untrained synthetic model of :mod:`sterling.testing.snapshots`).

Loading verifies every checksum and parses only safetensors (no pickle).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sterling.data.batch import ItemCatalog
from sterling.data.items import read_items
from sterling.index.item_index import IndexConfig, ItemIndex
from sterling.models.overarch import OverArch, OverArchConfig, make_overarch
from sterling.models.ranker import RankerConfig, SequenceRanker
from sterling.models.sequence_tower import SequenceTowerConfig, SequenceUserTower
from sterling.models.towers import ItemTerms, TaskQueries, TwoTowerConfig, UserTower
from sterling.retrieval.config import ServingConfig
from sterling.retrieval.export import aot_package, check_compiler, export_program
from sterling.retrieval.item_table import ItemEncoder, cache_rows
from sterling.retrieval.model import RetrievalModel
from sterling.snapshot import Snapshot, SnapshotError, read_snapshot, verify_snapshot, write_snapshot
from sterling.train.checkpoint import load_checkpoint
from sterling.train.encode import encode_catalog
from sterling.train.ranker_checkpoint import load_ranker_checkpoint
from sterling.train.sequence_checkpoint import load_sequence_checkpoint

__all__ = ["load_model", "publish", "rewrite_snapshot", "write_model_snapshot"]

_KIND = "retrieval_model"
#: The next-item task of a served sequence retriever.
NEXT_TASK = "next"


def publish(
    checkpoint: Path,
    items_path: Path,
    out_dir: Path,
    index_config: IndexConfig = IndexConfig(),
    k0: int = 1000,
    nprobe: int | None = None,
    value_formula: str | None = None,
    use_overarch: bool = True,
    export: bool = False,
    aot: bool = False,
    ranker: Path | None = None,
) -> Path:
    """Compose and write the served model of ``checkpoint`` over the items of ``items_path``.

    Args:
        checkpoint (Path): a training checkpoint (:func:`sterling.train.loop.train`).
        items_path (Path): the catalogue: every item the checkpoint was trained on, in any order;
            a two-tower checkpoint's items file may hold more items, which its item tower embeds
            *cold* (zero id embedding, the attribute terms it knows), as the served model embeds
            an item upserted without an embedding. A next-item retriever or a ranker embeds items
            by id: their items file lists exactly the trained items, in their order.
        out_dir (Path): the snapshot directory (replaced if it holds a snapshot).
        index_config (IndexConfig): how the index is built and searched.
        k0 (int): candidates per task query handed to OverArch.
        nprobe (int | None): lists probed (None: the index's default).
        value_formula (str | None): the Value Model over the task probabilities; a bad formula
            fails here, never at query time.
        use_overarch (bool): compose the checkpoint's OverArch (if it has one).
        export (bool): also write the ``torch.export`` program of the forward.
        aot (bool): also write its AOTInductor package (implies ``export``; needs a C++ compiler).
        ranker (Path | None): a request-level ranker checkpoint (``sterling train --ranker``) of
            the same catalogue: it scores the candidates (in place of the OverArch) and its tasks
            are the served ones.
    """
    if aot:
        check_compiler()  # before the work, not after it
    ranker_model = None
    if ranker is not None:
        found = load_ranker_checkpoint(ranker)
        _catalogue(items_path, found.item_ids)  # the ranker's item table is in this order
        ranker_model = found.model
    if verify_snapshot(checkpoint)["meta"].get("kind") == "sequence_checkpoint":
        return _publish_sequence(
            checkpoint, items_path, out_dir, index_config, k0, nprobe, value_formula, export, aot, ranker_model
        )
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.model.cfg
    primary = ckpt.meta["train"].get("retrieval_task")  # the task training retrieved for
    tasks = cfg.tasks if ranker_model is None else ranker_model.cfg.tasks
    serving = ServingConfig(
        tasks=tasks,
        features=cfg.context_features + cfg.user_features,
        k0=k0,
        nprobe=nprobe,
        primary_task=primary if primary in tasks else None,
        value_formula=value_formula,
        max_history=cfg.max_history,
        queries=() if tasks == cfg.tasks else cfg.tasks,
        retrieval_temperature=None if ranker_model is None else cfg.temperature,
    )  # bad settings and formulas fail here
    item_ids, attributes, rows = _catalogue(items_path, ckpt.item_ids, cold=True)
    overarch = ckpt.overarch if use_overarch else None
    cache_dtype = getattr(torch, (ckpt.meta["train"].get("overarch") or {}).get("cache_dtype", "float16"))
    encoder = ItemEncoder(ckpt.model.item_tower, ckpt.term_vocab)
    trained = [{}] * len(ckpt.item_ids)  # the trained items' attributes, in the checkpoint's row order
    for i in np.flatnonzero(rows >= 0):
        trained[rows[i]] = attributes[i]
    warm = encode_catalog(ckpt.model, ItemTerms.build(trained, vocab=ckpt.term_vocab), len(trained))
    vectors = warm.new_empty(len(item_ids), warm.shape[1])
    known = torch.from_numpy(rows >= 0)
    vectors[known] = warm[torch.from_numpy(rows[rows >= 0])]
    vectors[~known] = encoder([attributes[i] for i in np.flatnonzero(rows < 0)])
    return write_model_snapshot(
        Path(out_dir),
        cfg,
        ckpt.model.user_tower,
        ckpt.model.query_heads,
        overarch,
        item_ids,
        attributes,
        vectors,
        serving,
        index_config,
        cache_dtype,
        export=export,
        aot=aot,
        source={"data_dir": ckpt.meta.get("data_dir"), "metrics": ckpt.meta.get("metrics", {})},
        ranker=ranker_model,
        item_encoder=encoder,
    )


def _publish_sequence(
    checkpoint: Path,
    items_path: Path,
    out_dir: Path,
    index_config: IndexConfig,
    k0: int,
    nprobe: int | None,
    value_formula: str | None,
    export: bool,
    aot: bool,
    ranker: SequenceRanker | None,
) -> Path:
    """:func:`publish` of a next-item retriever: its encoder as the user tower, its item table as
    the item embeddings (L2-normalised in the index), no OverArch. A single-task retriever has one
    task query, :data:`NEXT_TASK` (the user embedding itself). A multi-task one (``sterling train
    --model hstu --multi-task``) serves ``(NEXT_TASK, *its tasks)``: the next query first (a zero
    residual, so the user embedding itself), then its trained task queries; each task's score of a
    candidate is its query's inner product with the candidate's stored vector, and the answer is
    ranked by the primary task's (``next`` unless a Value Model formula is given, or
    ``load_model(primary_task=...)`` picks a task). With a ranker, the ranker's tasks are the
    served ones and these are the queries that retrieve its candidates."""
    ckpt = load_sequence_checkpoint(checkpoint)
    cfg = ckpt.model.cfg
    towers = SequenceTowerConfig(cfg.encoder, cfg.dim, cfg.num_layers, cfg.num_heads, cfg.max_len, cfg.query_time)
    user_tower = SequenceUserTower(towers)
    user_tower.encoder.load_state_dict(ckpt.model.encoder.state_dict())
    names = (NEXT_TASK, *ckpt.model.tasks)
    tasks = names if ranker is None else ranker.cfg.tasks
    serving = ServingConfig(
        tasks=tasks,
        k0=k0,
        nprobe=nprobe,
        primary_task=NEXT_TASK if ranker is None and ckpt.model.tasks else None,  # next: tasks[0] either way
        value_formula=value_formula,
        max_history=cfg.max_len,
        queries=() if ranker is None else names,
        retrieval_temperature=None if ranker is None else cfg.temperature,
    )  # bad settings and formulas fail here
    item_ids, attributes, _ = _catalogue(items_path, ckpt.item_ids)
    queries = TaskQueries(cfg.dim, len(names))  # zero-initialised: next is the user embedding itself
    if ckpt.model.task_queries is not None:  # the trained heads after next's zero rows
        with torch.no_grad():
            queries.proj.weight[cfg.dim :] = ckpt.model.task_queries.proj.weight
            queries.proj.bias[cfg.dim :] = ckpt.model.task_queries.proj.bias
    return write_model_snapshot(
        Path(out_dir),
        towers,
        user_tower.eval(),
        queries,
        None,
        item_ids,
        attributes,
        ckpt.model.item_table.weight.detach().float(),
        serving,
        index_config,
        export=export,
        aot=aot,
        source={"data_dir": ckpt.meta.get("data_dir"), "metrics": ckpt.meta.get("metrics", {})},
        ranker=ranker,
    )


def _catalogue(
    items_path: Path, trained_ids: np.ndarray, cold: bool = False
) -> tuple[np.ndarray, list[dict], np.ndarray]:
    """The item ids and attributes of ``items_path`` and each item's row in the checkpoint's
    catalogue ``trained_ids`` (int64, -1: an item it does not hold). Every trained item must be
    there; with ``cold`` in any order and beside other items, without it alone and in order."""
    item_ids, attributes, _ = read_items(Path(items_path))
    order = np.argsort(trained_ids, kind="stable")
    at = np.searchsorted(trained_ids[order], item_ids).clip(max=max(len(trained_ids) - 1, 0))
    found = trained_ids[order][at] == item_ids if len(trained_ids) else np.zeros(len(item_ids), bool)
    rows = np.where(found, order[at], -1).astype(np.int64)
    if cold and int(found.sum()) < len(trained_ids):  # ids are unique in both
        held = np.zeros(len(trained_ids), bool)
        held[rows[found]] = True
        raise ValueError(
            f"{items_path}'s items differ from the {len(trained_ids):,} the checkpoint was trained on: it lacks "
            f"{int((~held).sum()):,} of them (e.g. {trained_ids[~held][:5].tolist()}); publish with the training "
            "data's items (more items may be added: the item tower embeds them cold)"
        )
    if not cold and not np.array_equal(item_ids, trained_ids):
        raise ValueError(
            f"{items_path} lists {len(item_ids):,} items that differ from the {len(trained_ids):,} items the "
            "checkpoint was trained on; a next-item retriever or a ranker embeds items by id: publish it with "
            "the training data's items.parquet (same items, same order)"
        )
    return item_ids, attributes, rows


def write_model_snapshot(
    out_dir: Path,
    towers: TwoTowerConfig | SequenceTowerConfig,
    user_tower: UserTower | SequenceUserTower,
    task_queries: TaskQueries,
    overarch: OverArch | None,
    item_ids: np.ndarray,
    attributes: Sequence[Mapping[str, Any]],
    vectors: torch.Tensor,
    serving: ServingConfig,
    index_config: IndexConfig = IndexConfig(),
    cache_dtype: torch.dtype = torch.float16,
    export: bool = False,
    aot: bool = False,
    source: dict | None = None,
    ranker: SequenceRanker | None = None,
    item_encoder: ItemEncoder | None = None,
) -> Path:
    """Write the served model of given towers over a catalogue's item embeddings: the index
    builder, the embedding cache and the composer of :func:`publish`, without a checkpoint.

    Args:
        out_dir (Path): the snapshot directory (replaced if it holds a snapshot).
        towers (TwoTowerConfig | SequenceTowerConfig): the sizes ``user_tower`` was built with.
        user_tower (UserTower | SequenceUserTower): history + features → ``[B, D]``.
        task_queries (TaskQueries): ``[B, D]`` → ``[B, T, D]``, ``T = len(serving.tasks)``.
        overarch (OverArch | None): the re-scorer (None: rank by inner product).
        item_ids (np.ndarray): int64 ``[N]`` unique external ids.
        attributes (Sequence[Mapping[str, Any]]): ``N`` attribute dicts, in ``item_ids`` order.
        vectors (torch.Tensor): float ``[N, D]`` item embeddings, in ``item_ids`` order: what the
            cache holds; the index holds ``user_tower.index_vectors(vectors)``.
        serving (ServingConfig): how the model answers.
        index_config (IndexConfig): how the index is built and searched.
        cache_dtype (torch.dtype): float16 or bfloat16, the embedding cache's dtype.
        export (bool): also write the ``torch.export`` program of the forward.
        aot (bool): also write its AOTInductor package (implies ``export``; needs a C++ compiler).
        source (dict | None): where the model came from (JSON), kept in the manifest.
        ranker (SequenceRanker | None): a request-level ranker trained on the same catalogue (its
            item table in ``item_ids`` row order): its item embeddings become the cache's last
            columns, its other weights the model's.
        item_encoder (ItemEncoder | None): the two-tower's item tower over attributes (its term
            table, MLP and term vocabulary): the loaded model embeds items upserted without an
            embedding with it (None: upserts need their embedding).
    """
    if aot:
        check_compiler()  # before the work, not after it
    index = ItemIndex.build(user_tower.index_vectors(vectors), attributes, ids=item_ids, config=index_config)
    segment_ids = index.executor_tensors()["ids"].numpy()
    in_segment = ItemCatalog(item_ids).rows(segment_ids)
    cache = cache_rows(vectors[in_segment], overarch, cache_dtype)
    if ranker is not None:
        ranker_items = ranker.items.weight.detach()[torch.from_numpy(in_segment)].to(cache_dtype)
        cache = torch.cat([cache, ranker_items], 1)
    index_meta, index_tensors = index.to_snapshot_parts()
    weights = {f"user_tower.{k}": v for k, v in user_tower.state_dict().items()}
    weights |= {f"task_queries.{k}": v for k, v in task_queries.state_dict().items()}
    if overarch is not None:
        weights |= {f"overarch.{k}": v for k, v in overarch.state_dict().items()}
    if ranker is not None:  # its item table lives in the cache
        weights |= {f"ranker.{k}": v for k, v in ranker.state_dict().items() if k != "items.weight"}
    if item_encoder is not None:
        weights |= item_encoder.weights()
    meta = {
        "kind": _KIND,
        "serving": serving.to_json(),
        "towers": towers.to_json(),
        "user_tower": "sequence" if isinstance(user_tower, SequenceUserTower) else "two_tower",
        "overarch": None if overarch is None else overarch.cfg.to_json(),
        "ranker": None if ranker is None else ranker.cfg.to_json(),
        "item_tower": None if item_encoder is None else {"term_vocab": list(item_encoder.vocab)},
        "index": index_meta,
        "source": source or {},
    }
    files = {
        "index": index_tensors,
        "cache": {"state": cache},
        "model": {k: v.detach().contiguous() for k, v in weights.items()},
    }
    if not (export or aot):
        return write_snapshot(Path(out_dir), files, meta)
    program = export_program(_compose(meta, files["model"], index, cache))
    blobs = {"program.pt2": program} | ({"program.aoti.pt2": aot_package(program)} if aot else {})
    return write_snapshot(Path(out_dir), files, meta, blobs=blobs)


def rewrite_snapshot(
    snap: Snapshot,
    out_dir: Path,
    index: ItemIndex,
    cache: torch.Tensor,
    meta: Mapping[str, Any] | None = None,
    blobs: Mapping[str, bytes] | None = None,
) -> Path:
    """Write the published snapshot ``snap``'s model over another catalogue state: ``index`` and its
    item table ``cache`` ``[N, S]`` (in ``index``'s row order), ``meta`` added to its manifest's
    (a compacted or a shard snapshot says what it is there). Its exported programs are not carried
    over (they were traced with the old index)."""
    index_meta, index_tensors = index.to_snapshot_parts()
    files = {"index": index_tensors, "cache": {"state": cache.contiguous()}, "model": snap.tensors["model"]}
    return write_snapshot(Path(out_dir), files, {**snap.meta, **(meta or {}), "index": index_meta}, blobs=blobs)


#: The :class:`ServingConfig` fields a loaded model may change (the rest describe the weights).
OVERRIDABLE = ("k0", "nprobe", "primary_task", "value_formula", "use_overarch", "use_ranker")


def load_model(path: Path, **overrides) -> RetrievalModel:
    """Load a published snapshot as a :class:`RetrievalModel` (checksums verified, no pickle).

    ``overrides`` replace the :data:`OVERRIDABLE` :class:`ServingConfig` fields (e.g. ``k0``,
    ``nprobe``, ``value_formula``, ``use_overarch``).
    """
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"cannot override {unknown}; a loaded model may change {list(OVERRIDABLE)}")
    snap = read_snapshot(Path(path))
    if snap.meta.get("kind") != _KIND:
        raise ValueError(f"{path} is a snapshot of kind {snap.meta.get('kind')!r}, not a published model")
    missing = sorted({"index", "cache", "model"} - set(snap.tensors)) + sorted(
        {"serving", "towers", "overarch", "index"} - set(snap.meta)
    )
    if "cache" in snap.tensors and "state" not in snap.tensors["cache"]:
        missing.append("cache.state")
    if missing:
        raise SnapshotError(f"snapshot {path} lacks {missing}; it was not written by sterling publish")
    try:
        serving = replace(ServingConfig.from_json(snap.meta["serving"]), **overrides)
    except TypeError as e:
        raise SnapshotError(f"snapshot {path} has a malformed serving config: {e}") from None
    index = ItemIndex.from_snapshot_parts(snap.meta["index"], snap.tensors["index"])
    meta = {**snap.meta, "serving": serving.to_json()}
    model = _compose(meta, snap.tensors["model"], index, snap.tensors["cache"]["state"])
    model.meta = snap.meta
    return model


def _compose(meta: dict, weights: dict[str, torch.Tensor], index: ItemIndex, cache: torch.Tensor) -> RetrievalModel:
    """The :class:`RetrievalModel` of a snapshot's parts."""
    serving = ServingConfig.from_json(meta["serving"])
    if meta.get("user_tower", "two_tower") == "sequence":
        user_tower: UserTower | SequenceUserTower = SequenceUserTower(SequenceTowerConfig(**meta["towers"]))
    else:
        user_tower = UserTower(TwoTowerConfig.from_json(meta["towers"]))
    task_queries = TaskQueries(index.dim, len(serving.query_tasks))
    overarch = None if meta["overarch"] is None else make_overarch(OverArchConfig(**meta["overarch"]))
    ranker = None
    if meta.get("ranker") is not None:  # its item table is the cache's last columns: no rows of its own
        ranker = SequenceRanker(RankerConfig.from_json({**meta["ranker"], "num_items": 0}))
        weights = {**weights, "ranker.items.weight": ranker.items.weight.detach()}
    modules = (
        ("user_tower.", user_tower),
        ("task_queries.", task_queries),
        ("overarch.", overarch),
        ("ranker.", ranker),
    )
    for prefix, module in modules:
        if module is not None:
            module.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
    encoder = None  # absent from sequence snapshots and those published before it
    if meta.get("item_tower") is not None:
        encoder = ItemEncoder.from_weights(
            TwoTowerConfig.from_json(meta["towers"]), meta["item_tower"]["term_vocab"], weights
        )
    model = RetrievalModel(user_tower, task_queries, index, cache, overarch, serving, ranker, encoder)
    return model.eval()
