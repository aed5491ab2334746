"""A two-tower training checkpoint in the snapshot format (:mod:`sterling.snapshot`): the model's
weights and config, the item ids of its catalogue (row order), the OverArch if one was trained, the
attribute-term vocabulary and the run's metadata. Read back without pickle, checksums verified."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sterling.models.overarch import OverArch, OverArchConfig, make_overarch
from sterling.models.towers import ItemTerms, TwoTower, TwoTowerConfig
from sterling.snapshot import read_snapshot, write_snapshot

__all__ = ["Checkpoint", "load_checkpoint", "write_checkpoint"]


@dataclass(frozen=True)
class Checkpoint:
    """A trained model, its OverArch (if one was trained), the item ids of its catalogue (row
    order) and the run's metadata."""

    model: TwoTower
    overarch: OverArch | None
    item_ids: np.ndarray
    meta: dict

    @property
    def term_vocab(self) -> tuple[str, ...]:
        """The attribute-term vocabulary the item tower was trained with."""
        return tuple(self.meta["item_terms"])


def write_checkpoint(
    out_dir: Path,
    model: TwoTower,
    item_ids: np.ndarray,
    item_terms: ItemTerms,
    overarch: OverArch | None,
    run: dict,
) -> Path:
    """Write ``model``, the catalogue's ``item_ids`` (int64 ``[N]``, row order), the vocabulary of
    ``item_terms``, ``overarch`` (or none) and ``run`` (JSON metadata of the run: its config, data
    directory, metrics) to ``out_dir``; returns the checkpoint's path."""
    meta = {
        "kind": "checkpoint",
        "model": model.cfg.to_json(),
        **run,
        "item_terms": list(item_terms.vocab),
        "overarch": None if overarch is None else overarch.cfg.to_json(),
    }
    files = {"model": {k: v.detach().contiguous() for k, v in model.state_dict().items()}}
    files["model"]["catalog.item_ids"] = torch.from_numpy(np.ascontiguousarray(item_ids))
    if overarch is not None:
        files["overarch"] = {k: v.detach().contiguous() for k, v in overarch.state_dict().items()}
    return write_snapshot(Path(out_dir), files, meta)


def load_checkpoint(path: Path) -> Checkpoint:
    """Load a checkpoint written by :func:`write_checkpoint` (checksums verified, no pickle)."""
    snap = read_snapshot(Path(path))
    if snap.meta.get("kind") != "checkpoint":
        raise ValueError(f"{path} is a snapshot of kind {snap.meta.get('kind')!r}, not a training checkpoint")
    tensors = dict(snap.tensors["model"])
    item_ids = tensors.pop("catalog.item_ids").numpy()
    model = TwoTower(TwoTowerConfig.from_json(snap.meta["model"]))
    model.load_state_dict(tensors)
    model.eval()
    arch = None
    if snap.meta.get("overarch") is not None:
        arch = make_overarch(OverArchConfig(**snap.meta["overarch"]))
        arch.load_state_dict(snap.tensors["overarch"])
        arch.eval()
    return Checkpoint(model, arch, item_ids, snap.meta)
