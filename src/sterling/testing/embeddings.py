"""Synthetic item embeddings shaped like learned ones, for tests and benchmarks."""

from __future__ import annotations

import numpy as np

__all__ = ["structured"]

_CHUNK = 1 << 20


def structured(rng: np.random.Generator, n: int, d: int, intrinsic: int = 10) -> np.ndarray:
    """float32 [n, d], unit norm: the recipe of ``faiss.contrib.datasets.SyntheticDataset`` (a
    ``intrinsic``-dimensional Gaussian mapped linearly into d dimensions, then through sin with
    random per-dimension frequencies, so the data lie near a curved low-dimensional manifold, as
    learned embeddings do), normalised for inner-product search."""
    basis = rng.random((intrinsic, d))
    frequency = rng.random(d) * 4 + 0.1
    x = np.sin((rng.standard_normal((n, intrinsic)) @ basis) * frequency).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
