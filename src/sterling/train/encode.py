"""Two-tower embeddings in bulk, without gradients: the whole catalogue, and a batch's requests."""

from __future__ import annotations

import torch

from sterling.data.batch import RequestBatch
from sterling.models.towers import ItemTerms, TwoTower

__all__ = ["encode_catalog", "encode_requests"]


@torch.no_grad()
def encode_catalog(model: TwoTower, item_terms: ItemTerms, num_items: int, chunk: int = 8192) -> torch.Tensor:
    """Embeddings ``float [N, D]`` of every item, in catalogue order."""
    return torch.cat(
        [model.encode_items(torch.arange(s, min(s + chunk, num_items)), item_terms) for s in range(0, num_items, chunk)]
    )


@torch.no_grad()
def encode_requests(model: TwoTower, batch: RequestBatch, item_vectors: torch.Tensor) -> torch.Tensor:
    """User embeddings ``[R, D]`` of a batch's requests, reading history through ``item_vectors [N, D]``."""
    return model.encode_users(
        item_vectors[batch.history_items],
        batch.history_actions,
        batch.history_offsets,
        {**batch.context, **batch.user_features},
    )
