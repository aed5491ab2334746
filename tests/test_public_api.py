"""The public API named in DESIGN.md stays importable with its documented signatures."""

import inspect

import sterling


def test_top_level_exports():
    assert {"ItemIndex", "IndexConfig", "SearchResult"} <= set(sterling.__all__)


def test_item_index_signatures():
    build = inspect.signature(sterling.ItemIndex.build)
    assert list(build.parameters)[:4] == ["embeddings", "attributes", "ids", "config"]
    search = inspect.signature(sterling.ItemIndex.search)
    assert {"queries", "k", "filter", "nprobe"} <= set(search.parameters)
    for name in ("upsert", "delete", "save", "load"):
        assert callable(getattr(sterling.ItemIndex, name))
