"""A request-level ranker's training checkpoint (``sterling train --ranker --out DIR``) in the
snapshot format (:mod:`sterling.snapshot`): what a served ranking stage reads.

Layout (one snapshot directory, kind ``"ranker_checkpoint"``)::

    manifest.json         meta: {"kind": "ranker_checkpoint",
                                 "ranker": RankerConfig.to_json(),   sizes, tasks (logit order)
                                 **run}            e.g. data_dir, ranking (the RankingConfig),
                                                   steps, metrics {"auc"|"ne"|"gauc": {task: float|null}}
    model.safetensors     the SequenceRanker's state_dict:
                            items.weight           float32 [N, D]   item table (row = catalogue row)
                            actions.weight         float32 [A+1, D] action bitmasks (+ TARGET)
                            positions.weight       float32 [P, D]   served positions
                            encoder.*              the HSTU / SASRec user tower
                            head.*                 the multi-task MLP, [2D] → [T]
                          and catalog.item_ids     int64 [N]   external item ids, in row order

Read back without pickle, every checksum verified (:func:`~sterling.snapshot.read_snapshot`).

Example::

    path = write_ranker_checkpoint(Path("runs/ranker"), model, item_ids, {"steps": 100})
    ckpt = load_ranker_checkpoint(path)
    logits = ckpt.model(batch, "roo")           # [K, T], the model in eval mode
    rows = ItemCatalog(ckpt.item_ids).rows(ids) # external ids → the model's item rows
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sterling.models.ranker import RankerConfig, SequenceRanker
from sterling.train.catalog_checkpoint import load_weights, read_catalog_checkpoint, write_catalog_checkpoint

__all__ = ["KIND", "RankerCheckpoint", "load_ranker_checkpoint", "write_ranker_checkpoint"]

#: The snapshot kind (``meta["kind"]``) of a ranker checkpoint.
KIND = "ranker_checkpoint"


@dataclass(frozen=True)
class RankerCheckpoint:
    """A trained request-level ranker, the item ids of its catalogue and the run's metadata.

    Args:
        model (SequenceRanker): the model, in eval mode; ``model.cfg.tasks`` names its ``T``
            logits, in order.
        item_ids (np.ndarray): int64 ``[N]`` external item ids; row ``i`` of the item table is item
            ``item_ids[i]``.
        meta (dict): the snapshot's metadata: ``kind``, ``ranker`` (``RankerConfig.to_json()``) and
            the run's keys (``data_dir``, ``ranking``, ``steps``, ``metrics`` …).
    """

    model: SequenceRanker
    item_ids: np.ndarray
    meta: dict


def write_ranker_checkpoint(out_dir: Path, model: SequenceRanker, item_ids: np.ndarray, run: dict) -> Path:
    """Write ``model`` and its catalogue to the snapshot ``out_dir`` (replaced if it holds one).

    Args:
        out_dir (Path): the snapshot directory.
        model (SequenceRanker): the model (its ``cfg`` and ``state_dict``, item table ``[N, D]``).
        item_ids (np.ndarray): int64 ``[N]`` the catalogue's external item ids, in row order.
        run (dict): JSON metadata of the run (data directory, config, metrics …; no NaN: write
            ``None``); may not use the keys ``kind``, ``ranker``.

    Returns:
        Path: the checkpoint's directory.
    """
    config = {"ranker": model.cfg.to_json()}
    return write_catalog_checkpoint(out_dir, KIND, model, item_ids, model.cfg.num_items, config, run)


def load_ranker_checkpoint(path: Path) -> RankerCheckpoint:
    """Load a checkpoint written by :func:`write_ranker_checkpoint` (checksums verified, no
    pickle); the model is in eval mode.

    Raises:
        SnapshotError: a missing, corrupt or modified snapshot (a ValueError).
        ValueError: a snapshot of another kind, or tensors that do not fit the config.
    """
    path = Path(path)
    meta, tensors, item_ids = read_catalog_checkpoint(path, KIND, "sterling train --ranker")
    try:
        cfg = RankerConfig.from_json(meta["ranker"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: the checkpoint's ranker config cannot be read: {e}") from None
    model = load_weights(SequenceRanker(cfg), tensors, item_ids, cfg.num_items, path)
    return RankerCheckpoint(model, item_ids, meta)
