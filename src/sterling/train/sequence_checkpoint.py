"""A next-item retriever's training checkpoint (``sterling train --model hstu|sasrec --out DIR``) in
the snapshot format (:mod:`sterling.snapshot`): what ``sterling publish`` reads to serve it.

Layout (one snapshot directory, kind ``"sequence_checkpoint"``)::

    manifest.json         meta: {"kind": "sequence_checkpoint",
                                 "retrieval": asdict(RetrievalConfig),   the model's sizes
                                 "num_items": N,
                                 **run}            e.g. data_dir, epoch, steps, metrics
    model.safetensors     the SequenceRetriever's state_dict:
                            item_table.weight      float32 [N, D]
                            encoder.*              the HSTU / SASRec encoder
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
import torch

from sterling.snapshot import read_snapshot, write_snapshot
from sterling.train.sequence_model import RetrievalConfig, SequenceRetriever

__all__ = ["KIND", "SequenceCheckpoint", "load_sequence_checkpoint", "write_sequence_checkpoint"]

#: The snapshot kind (``meta["kind"]``) of a sequence checkpoint.
KIND = "sequence_checkpoint"
#: The tensor file (``model.safetensors``) and the name of the catalogue's item ids in it.
_FILE = "model"
_ITEM_IDS = "catalog.item_ids"
_RESERVED = ("kind", "retrieval", "num_items")


@dataclass(frozen=True)
class SequenceCheckpoint:
    """A trained next-item retriever, the item ids of its catalogue and the run's metadata.

    Args:
        model (SequenceRetriever): the model, in eval mode.
        item_ids (np.ndarray): int64 ``[N]`` external item ids; row ``i`` of the item table is item
            ``item_ids[i]``.
        meta (dict): the snapshot's metadata: ``kind``, ``retrieval`` (the config), ``num_items``
            and the run's keys (``data_dir``, ``epoch``, ``metrics`` …).
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
            keys ``kind``, ``retrieval``, ``num_items``.

    Returns:
        Path: the checkpoint's directory.
    """
    item_ids = np.ascontiguousarray(item_ids, dtype=np.int64)
    if item_ids.ndim != 1 or len(item_ids) != model.num_items:
        raise ValueError(f"item_ids must be [{model.num_items}] (one per item row), got shape {item_ids.shape}")
    clash = sorted(set(run) & set(_RESERVED))
    if clash:
        raise ValueError(f"run metadata may not set {clash}: the checkpoint writes them")
    meta = {**run, "kind": KIND, "retrieval": dataclasses.asdict(model.cfg), "num_items": model.num_items}
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors[_ITEM_IDS] = torch.from_numpy(item_ids.copy())
    return write_snapshot(Path(out_dir), {_FILE: tensors}, meta)


def load_sequence_checkpoint(path: Path) -> SequenceCheckpoint:
    """Load a checkpoint written by :func:`write_sequence_checkpoint` (checksums verified, no
    pickle); the model is in eval mode.

    Raises:
        SnapshotError: a missing, corrupt or modified snapshot (a ValueError).
        ValueError: a snapshot of another kind, or tensors that do not fit the config.
    """
    path = Path(path)
    snap = read_snapshot(path)
    kind = snap.meta.get("kind")
    if kind != KIND:
        raise ValueError(f"{path} is a snapshot of kind {kind!r}, not a {KIND!r} (sterling train --model hstu|sasrec)")
    try:
        cfg = RetrievalConfig(**snap.meta["retrieval"])
        num_items = int(snap.meta["num_items"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: the checkpoint's retrieval config cannot be read: {e}") from None
    tensors = dict(snap.tensors.get(_FILE, {}))
    if _ITEM_IDS not in tensors:
        raise ValueError(f"{path}: no {_ITEM_IDS} tensor in {_FILE}.safetensors")
    item_ids = tensors.pop(_ITEM_IDS).numpy().copy()
    if item_ids.shape != (num_items,):
        raise ValueError(f"{path}: {_ITEM_IDS} has shape {item_ids.shape}, meta says {num_items} items")
    model = SequenceRetriever(num_items, cfg)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise ValueError(f"{path}: the tensors do not fit a {cfg.encoder} retriever of its config: {e}") from None
    return SequenceCheckpoint(model.eval(), item_ids, snap.meta)
