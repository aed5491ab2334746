"""sterling: index-as-model recommendation serving trained on request-level data.

The public Python API::

    from sterling import ItemIndex, IndexConfig
    index = ItemIndex.build(embeddings, attributes)
    res = index.search(queries, k=10, filter="genre:Drama AND NOT year:1995")
"""

from sterling.index.item_index import IndexConfig, ItemIndex, SearchResult

__all__ = ["IndexConfig", "ItemIndex", "SearchResult"]
__version__ = "0.1.0"
