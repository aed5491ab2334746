"""The snapshot layout shared by the checkpoints of models over an item catalogue (the next-item
retriever's, :mod:`sterling.train.sequence_checkpoint`; the ranker's,
:mod:`sterling.train.ranker_checkpoint`): one tensor file ``model.safetensors`` holding the model's
``state_dict`` and ``catalog.item_ids`` (int64 ``[N]``, the external item id of every item-table
row), and the meta ``{"kind": ..., <config keys>..., **run}``. Read back without pickle, every
checksum verified (:func:`~sterling.snapshot.read_snapshot`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from sterling.snapshot import read_snapshot, write_snapshot

__all__ = ["ITEM_IDS", "load_weights", "read_catalog_checkpoint", "write_catalog_checkpoint"]

#: The tensor file and the name of the catalogue's item ids in it.
FILE = "model"
ITEM_IDS = "catalog.item_ids"


def write_catalog_checkpoint(
    out_dir: Path, kind: str, module: nn.Module, item_ids: np.ndarray, num_items: int, config: dict, run: dict
) -> Path:
    """Write ``module``'s state_dict and ``item_ids`` (int64 ``[num_items]``, row order) to the
    snapshot ``out_dir`` with meta ``{"kind": kind, **config, **run}`` (``run`` may not set a key of
    ``config`` or ``kind``); returns its path."""
    item_ids = np.ascontiguousarray(item_ids, dtype=np.int64)
    if item_ids.ndim != 1 or len(item_ids) != num_items:
        raise ValueError(f"item_ids must be [{num_items}] (one per item row), got shape {item_ids.shape}")
    clash = sorted(set(run) & {"kind", *config})
    if clash:
        raise ValueError(f"run metadata may not set {clash}: the checkpoint writes them")
    tensors = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    tensors[ITEM_IDS] = torch.from_numpy(item_ids.copy())
    return write_snapshot(Path(out_dir), {FILE: tensors}, {**run, "kind": kind, **config})


def read_catalog_checkpoint(path: Path, kind: str, written_by: str) -> tuple[dict, dict[str, torch.Tensor], np.ndarray]:
    """The meta, the model tensors and the item ids ``int64 [N]`` of a checkpoint of ``kind``; a
    snapshot of another kind is a ValueError naming both (and ``written_by``, the command that
    writes this kind); a corrupt one a SnapshotError."""
    snap = read_snapshot(Path(path))
    found = snap.meta.get("kind")
    if found != kind:
        raise ValueError(f"{path} is a snapshot of kind {found!r}, not a {kind!r} ({written_by})")
    tensors = dict(snap.tensors.get(FILE, {}))
    if ITEM_IDS not in tensors:
        raise ValueError(f"{path}: no {ITEM_IDS} tensor in {FILE}.safetensors")
    return snap.meta, tensors, tensors.pop(ITEM_IDS).numpy().copy()


def load_weights(module: nn.Module, tensors: dict[str, torch.Tensor], item_ids: np.ndarray, num_items: int, path: Path):
    """``module`` with ``tensors`` loaded, in eval mode, after checking ``item_ids`` against
    ``num_items``; a mismatch is a ValueError naming ``path``."""
    if item_ids.shape != (num_items,):
        raise ValueError(f"{path}: {ITEM_IDS} has shape {item_ids.shape}, the config says {num_items} items")
    try:
        module.load_state_dict(tensors)
    except RuntimeError as e:
        raise ValueError(f"{path}: the tensors do not fit the checkpoint's config: {e}") from None
    return module.eval()
