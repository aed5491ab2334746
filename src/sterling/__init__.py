"""sterling: index-as-model recommendation serving trained on request-level data.

The public Python API::

    from sterling import ItemIndex, IndexConfig
    index = ItemIndex.build(embeddings, attributes)
    res = index.search(queries, k=10, filter="genre:Drama AND NOT year:1995")

Threads: torch's CPU build runs on GNU OpenMP, whose idle worker threads busy-wait for about
300,000 spins (milliseconds) after every parallel torch op. A spinning OpenMP thread holds a core
that sterling's CPU kernels (their own threads) need: measured on 2 cores, searches ran 25-45%
slower when a parallel torch op came right before the scan. So an IVF search runs none (the probe
of the centroids is a numba kernel, :mod:`sterling.ops.nearest_lists`); the gather plan's int8
product (``torch._int_mm``) still is one. Unless the environment already sets it, importing
sterling **before torch** caps the spin at 10,000 (``GOMP_SPINCOUNT``, read once when torch
loads), which keeps back-to-back torch ops fast.
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from sterling.index.item_index import IndexConfig, ItemIndex, SearchResult

__all__ = ["IndexConfig", "ItemIndex", "SearchResult"]
__version__ = "0.1.0"
