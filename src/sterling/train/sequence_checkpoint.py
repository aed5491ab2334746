"""A next-item retriever's training checkpoint (``sterling train --model hstu|sasrec --out DIR``) in
the snapshot format (:mod:`sterling.snapshot`): what ``sterling publish`` reads to serve it.

Layout (one snapshot directory, kind ``"sequence_checkpoint"``)::

    manifest.json         meta: {"kind": "sequence_checkpoint",
                                 "retrieval": asdict(RetrievalConfig),   the model's sizes
                                 "num_items": N,
                                 "tasks": [...],   a multi-task model's task names, head order
                                                   ([] single-task; absent in older checkpoints)
                                 **run}            e.g. data_dir, epoch, steps, metrics
    model.safetensors     the SequenceRetriever's state_dict:
                            item_table.weight      float32 [N, D]
                            encoder.*              the HSTU / SASRec encoder
                            task_queries.proj.*    multi-task only: weight [T·D, D], bias [T·D]
                          and catalog.item_ids     int64 [N]   external item ids, in row order

Read back without pickle, every checksum verified (:func:`~sterling.snapshot.read_snapshot`).

Example::

    path = write_sequence_checkpoint(Path("ckpt/best"), model, item_ids, {"epoch": 3})
    ckpt = load_sequence_checkpoint(path)
    q = ckpt.model(items, ts, offsets)          # [L, D], the model in eval mode
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sterling.train.catalog_checkpoint import load_weights, read_catalog_checkpoint, write_catalog_checkpoint
from sterling.train.sequence_model import RetrievalConfig, SequenceRetriever

__all__ = ["KIND", "SequenceCheckpoint", "load_sequence_checkpoint", "write_sequence_checkpoint"]

#: The snapshot kind (``meta["kind"]``) of a sequence checkpoint.
KIND = "sequence_checkpoint"


@dataclass(frozen=True)
class SequenceCheckpoint:
    """A trained next-item retriever, the item ids of its catalogue and the run's metadata.

    Args:
        model (SequenceRetriever): the model, in eval mode.
        item_ids (np.ndarray): int64 ``[N]`` external item ids; row ``i`` of the item table is item
            ``item_ids[i]``.
        meta (dict): the snapshot's metadata: ``kind``, ``retrieval`` (the config), ``num_items``,
            ``tasks`` (a multi-task model's task names) and the run's keys (``data_dir``, ``epoch``, ``metrics`` …).
    """

    model: SequenceRetriever
    item_ids: np.ndarray
    meta: dict


def write_sequence_checkpoint(out_dir: Path, model: SequenceRetriever, item_ids: np.ndarray, run: dict) -> Path:
    """Write ``model`` and its catalogue to the snapshot ``out_dir`` (replaced if it holds one).

    Args:
        out_dir (Path): the snapshot directory.
        model (SequenceRetriever): the model (its ``cfg`` and ``state_dict``, item table ``[N, D]``).
        item_ids (np.ndarray): int64 ``[N]`` the catalogue's external item ids, in row order.
        run (dict): JSON metadata of the run (data directory, epoch, metrics …); may not use the
            keys ``kind``, ``retrieval``, ``num_items``, ``tasks``.

    Returns:
        Path: the checkpoint's directory.
    """
    config = {"retrieval": dataclasses.asdict(model.cfg), "num_items": model.num_items, "tasks": list(model.tasks)}
    return write_catalog_checkpoint(out_dir, KIND, model, item_ids, model.num_items, config, run)


def load_sequence_checkpoint(path: Path) -> SequenceCheckpoint:
    """Load a checkpoint written by :func:`write_sequence_checkpoint` (checksums verified, no
    pickle); the model is in eval mode.

    Raises:
        SnapshotError: a missing, corrupt or modified snapshot (a ValueError).
        ValueError: a snapshot of another kind, or tensors that do not fit the config.
    """
    path = Path(path)
    meta, tensors, item_ids = read_catalog_checkpoint(path, KIND, "sterling train --model hstu|sasrec")
    try:
        # written before query_time / tie_order existed: the query's own event's time, stored ties
        cfg = RetrievalConfig(**{"query_time": "event", "tie_order": "stored", **meta["retrieval"]})
        num_items = int(meta["num_items"])
        tasks = tuple(meta.get("tasks", ()))
        module = SequenceRetriever(num_items, cfg, tasks)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: the checkpoint's retrieval config cannot be read: {e}") from None
    model = load_weights(module, tensors, item_ids, num_items, path)
    return SequenceCheckpoint(model, item_ids, meta)
