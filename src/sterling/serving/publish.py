"""Publish a trained checkpoint as one snapshot, and load it back to answer queries.

A published snapshot holds, in one directory with one manifest (see :mod:`sterling.serving.snapshot`):

* ``index.safetensors``: the item index (item embeddings from the item tower, external ids, the
  exact attribute forward index; vocabulary in the manifest);
* ``model.safetensors``: the model weights (the user tower answers queries).

:class:`Recommender` loads it (checksums verified, no pickle) and turns a user's history into
filtered top-k items. The user tower reads the history through the item embeddings the index
caches, so a query never re-runs the item tower.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sterling.data.items import read_items
from sterling.index.item_index import IndexConfig, ItemIndex, SearchResult
from sterling.models.towers import ItemTerms, TwoTower, TwoTowerConfig
from sterling.serving.snapshot import read_snapshot, write_snapshot
from sterling.train.loop import encode_catalog, load_checkpoint

__all__ = ["Recommender", "publish"]

_MODEL_FILE = "model"
_INDEX_FILE = "index"


def publish(checkpoint: Path, items_path: Path, out_dir: Path, config: IndexConfig = IndexConfig()) -> Path:
    """Encode every item of ``items_path`` with the checkpoint's item tower, build the index and
    write the snapshot to ``out_dir``.

    The items table must list the catalogue the model was trained on, in the same order.
    """
    ckpt = load_checkpoint(checkpoint)
    item_ids, attributes, _ = read_items(Path(items_path))
    if not np.array_equal(item_ids, ckpt.item_ids):
        raise ValueError(
            f"{items_path} lists {len(item_ids):,} items that differ from the {len(ckpt.item_ids):,} "
            "items the checkpoint was trained on; publish with the training data's items.parquet"
        )
    terms = ItemTerms.build(attributes, vocab=ckpt.term_vocab)
    embeddings = encode_catalog(ckpt.model, terms, len(item_ids))
    index = ItemIndex.build(embeddings, attributes, ids=item_ids, config=config)
    index_meta, index_tensors = index.to_snapshot_parts()
    model_tensors = {k: v.detach().contiguous() for k, v in ckpt.model.state_dict().items()}
    meta = {
        "kind": "retrieval",
        "index": index_meta,
        "model": ckpt.meta["model"],
        "source": {"data_dir": ckpt.meta.get("data_dir"), "metrics": ckpt.meta.get("metrics", {})},
    }
    return write_snapshot(Path(out_dir), {_INDEX_FILE: index_tensors, _MODEL_FILE: model_tensors}, meta)


class Recommender:
    """A loaded published snapshot: user tower + item index.

    Args:
        model (TwoTower): the trained model (its user tower is used).
        index (ItemIndex): the item index.
        meta (dict): the snapshot's metadata.

    Example::

        rec = Recommender.load("runs/demo/snapshot")
        res = rec.recommend([12, 7, 31], filter="language:en AND year >= 2000", k=10)
    """

    def __init__(self, model: TwoTower, index: ItemIndex, meta: dict) -> None:
        self.model = model
        self.index = index
        self.meta = meta

    @classmethod
    def load(cls, path: Path) -> "Recommender":
        snap = read_snapshot(Path(path))
        if snap.meta.get("kind") != "retrieval":
            raise ValueError(f"{path} is a snapshot of kind {snap.meta.get('kind')!r}, not a published model")
        model = TwoTower(TwoTowerConfig.from_json(snap.meta["model"]))
        model.load_state_dict(snap.tensors[_MODEL_FILE])
        model.eval()
        index = ItemIndex.from_snapshot_parts(snap.meta["index"], snap.tensors[_INDEX_FILE])
        return cls(model, index, snap.meta)

    @torch.no_grad()
    def user_embedding(
        self,
        history: list[int] | np.ndarray,
        actions: list[int] | np.ndarray | None = None,
        features: dict[str, int] | None = None,
    ) -> torch.Tensor:
        """Embedding ``[1, D]`` of one user from the item ids of their history (oldest first), the
        action bitmask of each event (default 1) and encoded context / user features."""
        history = np.asarray(history, dtype=np.int64)
        acts = np.ones(len(history), dtype=np.int64) if actions is None else np.asarray(actions, dtype=np.int64)
        if acts.shape != history.shape:
            raise ValueError(f"{len(history)} history items but {len(acts)} actions")
        history, acts = history[-self.model.cfg.max_history :], acts[-self.model.cfg.max_history :]
        vectors = self.index.embeddings_of(history) if len(history) else torch.zeros(0, self.index.dim)
        known = set(self.model.cfg.context_features + self.model.cfg.user_features)
        unknown = sorted(set(features or {}) - known)
        if unknown:
            raise ValueError(f"unknown features {unknown}; the model takes {sorted(known)}")
        feats = {n: torch.tensor([int(v)]) for n, v in (features or {}).items()}
        return self.model.encode_users(
            torch.as_tensor(vectors, dtype=torch.float32), torch.from_numpy(acts), torch.tensor([0, len(history)]), feats
        )

    def recommend(
        self,
        history: list[int] | np.ndarray,
        filter: str | None = None,
        k: int = 10,
        actions: list[int] | np.ndarray | None = None,
        features: dict[str, int] | None = None,
    ) -> SearchResult:
        """Top-``k`` items for one user under ``filter`` (ids ``[1, k]``, scores ``[1, k]``)."""
        return self.index.search(self.user_embedding(history, actions, features), k=k, filter=filter)
