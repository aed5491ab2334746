"""Vector databases a user would install, as peers in ``sterling bench ann``: LanceDB and Milvus Lite.

Each is used as its documentation says: the items' attributes are columns (LanceDB, with scalar
indexes) or scalar fields (Milvus, with inverted indexes), and a filter is the database's own
expression, translated from sterling's filter language by :func:`translate_filter` (one function,
two dialects, tested against sterling's exact filter). Per-query filters cost one call per query;
a batch sharing one filter is one call.

Index types: IVF at ``n >= IVF_FROM`` items (their HNSW types take over 10 minutes to build 1M
items on 2 cores), HNSW below (``--quick`` and MovieLens). Milvus Lite (3.2.2) answers a selective
filter with fewer than k items from its IVF and HNSW indexes, even with every list probed (its FLAT
index answers in full): its low recall at 10% and 1% is what a user of it gets.

Layout: categorical single-valued features are string columns (null where missing), multi-valued
ones string lists (empty where missing), numeric ones int64 / float64 (null where missing). Values
of categorical features are stored as strings, so a quoted ``"2020"`` also matches an int value
``2020`` of a feature mixing both forms (sterling's exact filter does not).
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from sterling.index.attributes import AttributeStore
from sterling.index.columns import CategoricalColumn, NumericColumn
from sterling.index.filter import And, Compare, FilterError, FilterNode, Not, Or, Term, as_number, parse

if TYPE_CHECKING:
    from sterling.bench.ann import AnnBenchConfig, Catalogue, Searcher

__all__ = ["IVF_FROM", "Field", "lancedb_systems", "milvus_systems", "schema_of", "translate_filter"]

Dialect = Literal["lance", "milvus"]

#: catalogue size from which the peers use IVF indexes rather than HNSW.
IVF_FROM = 200_000

_ID, _VECTOR = "id", "vector"
_RESERVED = {_ID, _VECTOR, "in", "like", "is", "null", "not", "and", "or", "true", "false", "exists"}
_OPS = {"lance": {"=": "="}, "milvus": {"=": "=="}}
_WORDS = {
    "lance": {"and": "AND", "or": "OR", "not": "NOT", "false": "FALSE", "true": "TRUE"},
    # Milvus has no boolean literal in filters; the primary key is a row number, never negative.
    "milvus": {"and": "and", "or": "or", "not": "not", "false": f"{_ID} < 0", "true": f"{_ID} >= 0"},
}


@dataclass(frozen=True)
class Field:
    """How one sterling feature is stored in a peer's table.

    Args:
        column (str): the column / field name (the feature's own name when it is a plain lowercase
            identifier, else ``attr_<i>``).
        kind (str): ``"categorical"`` (one string), ``"multi"`` (a list of strings) or ``"numeric"``.
        integral (bool): numeric and every value an int (int64; comparisons are made exact in ints).
        nullable (bool): some item lacks the feature (single-valued kinds store null there).
    """

    column: str
    kind: Literal["categorical", "multi", "numeric"]
    integral: bool = False
    nullable: bool = False


def schema_of(store: AttributeStore) -> dict[str, Field]:
    """The peer-table layout of every feature of ``store``."""
    schema = {}
    for i, (name, column) in enumerate(store.columns.items()):
        safe = re.fullmatch(r"[a-z][a-z0-9_]*", name) and name not in _RESERVED
        col = name if safe else f"attr_{i}"
        if isinstance(column, CategoricalColumn):
            kind = "multi" if column.multi else "categorical"
            nullable = bool((column.lengths() == 0).any())
            schema[name] = Field(col, kind, nullable=nullable and kind == "categorical")
        else:
            schema[name] = Field(col, "numeric", integral=column.integral, nullable=not bool(column.present.all()))
    return schema


def _string(value: object, dialect: Dialect) -> str:
    text = str(value)
    if dialect == "lance":
        return "'" + text.replace("'", "''") + "'"
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _literal(x: float, field: Field) -> str:
    """A number as a literal for ``field``'s column: an int for int64 columns (both peers reject a
    float literal there), a float for float64 ones."""
    return str(int(x)) if field.integral else repr(float(x))


def _int_compare(op: str, x: float) -> tuple[str, int] | bool:
    """``v op x`` for an integer ``v`` as ``(op', t)`` with an integer ``t`` (as sterling's exact
    integer comparison does), or the constant answer for every present value."""
    if op in (">=", "<"):
        return op, math.ceil(x)
    if op in ("<=", ">"):
        return op, math.floor(x)
    if x != math.floor(x):
        return op == "!="
    return op, int(x)


def translate_filter(expr: str | FilterNode, schema: dict[str, Field], dialect: Dialect) -> str:
    """Translates a sterling filter into a LanceDB ``where`` clause or a Milvus ``filter`` expression.

    The translation reads sterling's parse tree (:func:`sterling.index.filter.parse`) and keeps its
    semantics: a missing value passes no condition (so ``NOT`` keeps items lacking the feature),
    ``Term`` / ``In`` test membership (lists: any of the values), comparisons are numeric.

    Args:
        expr (str | FilterNode): the filter text or its parse tree.
        schema (dict[str, Field]): the table layout, from :func:`schema_of`.
        dialect (str): ``"lance"`` (DataFusion SQL) or ``"milvus"``.

    Returns:
        str: the expression, e.g. ``array_has_any(genre, ['Drama'])`` or
        ``ARRAY_CONTAINS_ANY(genre, ["Drama"])``.

    Raises:
        FilterError: for an unknown feature or a comparison on a categorical feature.
    """
    text = expr if isinstance(expr, str) else None
    node = parse(expr) if isinstance(expr, str) else expr
    words = _WORDS[dialect]

    def present(field: Field, condition: str) -> str:
        return f"({ident(field)} IS NOT NULL {words['and']} {condition})" if field.nullable else condition

    def ident(field: Field) -> str:
        return f"`{field.column}`" if dialect == "lance" else field.column

    def values_in(field: Field, values: tuple) -> str:
        if field.kind == "numeric":
            numbers = [x for x in map(as_number, values) if x is not None]
            if field.integral:
                numbers = [x for x in numbers if x == math.floor(x)]
            literals = sorted({_literal(x, field) for x in numbers})
        else:
            literals = sorted({_string(v, dialect) for v in values})
        if not literals:
            return words["false"]
        col = ident(field)
        if field.kind == "multi":
            if dialect == "lance":
                return f"array_has_any({col}, [{', '.join(literals)}])"
            return f"ARRAY_CONTAINS_ANY({col}, [{', '.join(literals)}])"
        if len(literals) == 1:
            return present(field, f"{col} {_OPS[dialect]['=']} {literals[0]}")
        listed = f"({', '.join(literals)})" if dialect == "lance" else f"[{', '.join(literals)}]"
        return present(field, f"{col} {'IN' if dialect == 'lance' else 'in'} {listed}")

    def compare(field: Field, node: Compare) -> str:
        op, x = node.op, float(node.number)
        if field.integral:
            exact = _int_compare(op, x)
            if isinstance(exact, bool):
                return present(field, words["true"]) if exact else words["false"]
            op, x = exact
        return present(field, f"{ident(field)} {_OPS[dialect].get(op, op)} {_literal(x, field)}")

    def walk(node: FilterNode) -> str:
        if isinstance(node, Not):
            return f"{words['not']} ({walk(node.child)})"
        if isinstance(node, (And, Or)):
            joiner = f" {words['and' if isinstance(node, And) else 'or']} "
            return "(" + joiner.join(walk(child) for child in node.children) + ")"
        field = schema.get(node.feature)
        if field is None:
            raise FilterError(f"unknown feature '{node.feature}'", text, node.pos)
        if isinstance(node, Compare):
            if field.kind != "numeric":
                raise FilterError(f"feature '{node.feature}' is not numeric", text, node.pos)
            return compare(field, node)
        return values_in(field, (node.value,) if isinstance(node, Term) else node.values)

    return walk(node)


def _pad(found: list[int], k: int) -> np.ndarray:
    out = np.full(k, -1, dtype=np.int64)
    out[: len(found)] = found[:k]
    return out


def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _values(store: AttributeStore, name: str, field: Field) -> list:
    """One feature's values per item, in the peer layout."""
    column = store.columns[name]
    if isinstance(column, NumericColumn):
        present = column.present.numpy()
        values = column.data.numpy().astype(np.int64 if field.integral else np.float64).tolist()
        return [v if ok else None for v, ok in zip(values, present.tolist())]
    vocab = np.array([str(v) for v in column.vocab] + [None], dtype=object)
    strings = vocab[column.value_ids.numpy().astype(np.int64)].tolist()  # -1 (missing) reads None
    if column.offsets is not None:
        bounds = column.offsets.numpy().astype(np.int64).tolist()
        return [strings[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    if field.kind == "multi":
        return [[] if s is None else [s] for s in strings]
    return strings


def lancedb_table(db, table_name: str, x: np.ndarray, store: AttributeStore, schema: dict[str, Field]):
    """A LanceDB table of ``x`` and the attributes, with scalar indexes on the attributes."""
    import pyarrow as pa
    from lancedb.index import Bitmap, BTree, LabelList

    columns = {
        _ID: pa.array(np.arange(len(x), dtype=np.int64)),
        _VECTOR: pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x, np.float32).ravel()), x.shape[1]),
    }
    for name, field in schema.items():
        kind = {"multi": pa.list_(pa.string()), "categorical": pa.string()}.get(field.kind)
        columns[field.column] = pa.array(
            _values(store, name, field), type=kind or (pa.int64() if field.integral else pa.float64())
        )
    table = db.create_table(table_name, pa.table(columns), mode="overwrite")
    for field in schema.values():
        index = {"multi": LabelList(), "categorical": Bitmap()}.get(field.kind, BTree())
        table.create_index(field.column, config=index)
    return table


def lancedb_systems(cat: Catalogue, cfg: AnnBenchConfig) -> list[tuple[str, str, float, float, Searcher]]:
    """LanceDB: IVF-PQ (``nlist`` partitions, PQ of ``d/4`` bytes, refined by exact distances) at
    ``n >= IVF_FROM``, else HNSW-SQ; inner product; attributes filtered with ``prefilter=True``."""
    import lancedb
    from lancedb.index import HnswSq, IvfPq

    x, n, d = cat.embeddings, len(cat.embeddings), cat.embeddings.shape[1]
    schema = schema_of(cat.store)
    tmp = tempfile.TemporaryDirectory(prefix="sterling-lancedb-")
    t0 = time.perf_counter()
    table = lancedb_table(lancedb.connect(tmp.name), "items", x, cat.store, schema)
    if n >= IVF_FROM:
        table.create_index(
            _VECTOR, config=IvfPq(distance_type="dot", num_partitions=cfg.nlist, num_sub_vectors=max(1, d // 4))
        )
        settings = [
            (f"IVF{cfg.nlist},PQ{d // 4} nprobes={p} refine=10", {"nprobes": p, "refine": 10})
            for p in (cfg.nprobes[0], cfg.nprobes[-1])
        ]
    else:
        table.create_index(_VECTOR, config=HnswSq(distance_type="dot", num_partitions=1, m=16, ef_construction=100))
        settings = [(f"HNSW-SQ M16 efc100 ef={ef}", {"ef": max(ef, cfg.k)}) for ef in cfg.hnsw_efs or (cfg.k,)]
    build = time.perf_counter() - t0
    bytes_per_item = _disk_bytes(Path(tmp.name)) / n

    def searcher(params: dict) -> Searcher:
        def query(q: np.ndarray, where: str):
            search = table.search(q, vector_column_name=_VECTOR).distance_type("dot").where(where, prefilter=True)
            if "ef" in params:
                search = search.ef(params["ef"])
            else:
                search = search.nprobes(params["nprobes"]).refine_factor(params["refine"])
            return search.limit(cfg.k).select([_ID, "_distance"]).to_arrow()

        def search(q: np.ndarray, filters: list[str]) -> np.ndarray:
            out = np.full((len(q), cfg.k), -1, dtype=np.int64)
            if len(set(filters)) == 1 and len(q) > 1:
                found = query(q, translate_filter(filters[0], schema, "lance"))
                ids = found.column(_ID).to_numpy()
                which = found.column("query_index").to_numpy()
                for i in range(len(q)):
                    out[i] = _pad(ids[which == i].tolist(), cfg.k)
            else:
                for i, flt in enumerate(filters):
                    out[i] = _pad(query(q[i], translate_filter(flt, schema, "lance")).column(_ID).to_pylist(), cfg.k)
            return out

        search.workdir = tmp  # type: ignore[attr-defined]  # the table's folder lives as long as the searcher
        return search

    return [("lancedb", config, build, bytes_per_item, searcher(params)) for config, params in settings]


def milvus_collection(
    client, collection: str, x: np.ndarray, store: AttributeStore, schema: dict[str, Field], index: dict
):
    """A loaded Milvus collection of ``x`` and the attributes (scalar fields, inverted indexes on
    the single-valued ones: Milvus Lite indexes no ARRAY field), with the vector index ``index``."""
    from pymilvus import DataType

    values = {name: _values(store, name, field) for name, field in schema.items()}
    fields = client.create_schema(auto_id=False, enable_dynamic_field=False)
    fields.add_field(_ID, DataType.INT64, is_primary=True)
    fields.add_field(_VECTOR, DataType.FLOAT_VECTOR, dim=x.shape[1])
    params = client.prepare_index_params()
    params.add_index(_VECTOR, metric_type="IP", **index)
    for name, field in schema.items():
        if field.kind == "numeric":
            fields.add_field(
                field.column, DataType.INT64 if field.integral else DataType.DOUBLE, nullable=field.nullable
            )
        else:
            strings = [s for v in values[name] for s in (v if isinstance(v, list) else [v]) if s is not None]
            length = max([len(s.encode()) for s in strings] + [1])
            if field.kind == "multi":
                capacity = max([len(v) for v in values[name]] + [1])
                fields.add_field(
                    field.column,
                    DataType.ARRAY,
                    element_type=DataType.VARCHAR,
                    max_capacity=capacity,
                    max_length=length,
                )
                continue
            fields.add_field(field.column, DataType.VARCHAR, max_length=length, nullable=field.nullable)
        params.add_index(field.column, index_type="INVERTED")
    if client.has_collection(collection):
        client.drop_collection(collection)
    client.create_collection(collection, schema=fields)
    for s in range(0, len(x), 10_000):
        rows = [
            {_ID: i, _VECTOR: x[i], **{field.column: values[f][i] for f, field in schema.items()}}
            for i in range(s, min(len(x), s + 10_000))
        ]
        client.insert(collection, rows)
    client.flush(collection)  # seal the segments, so that the indexes cover every row
    client.create_index(collection, params, sync=True)
    client.load_collection(collection)


def milvus_systems(cat: Catalogue, cfg: AnnBenchConfig) -> list[tuple[str, str, float, float, Searcher]]:
    """Milvus Lite (a local file): IVF_SQ8 (``nlist`` lists) at ``n >= IVF_FROM``, else HNSW;
    inner product; attributes as scalar fields filtered by ``filter=`` expressions."""
    import milvus_lite  # noqa: F401  (a MilvusClient on a local file needs it: without it the peer is skipped)
    from pymilvus import MilvusClient

    x, n = cat.embeddings, len(cat.embeddings)
    schema = schema_of(cat.store)
    tmp = tempfile.TemporaryDirectory(prefix="sterling-milvus-")
    t0 = time.perf_counter()
    client = MilvusClient(str(Path(tmp.name) / "items.db"))
    if n >= IVF_FROM:
        index = {"index_type": "IVF_SQ8", "params": {"nlist": cfg.nlist}}
        settings = [(f"IVF{cfg.nlist},SQ8 nprobe={p}", {"nprobe": p}) for p in (cfg.nprobes[0], cfg.nprobes[-1])]
    else:
        index = {"index_type": "HNSW", "params": {"M": 16, "efConstruction": 100}}
        settings = [(f"HNSW M16 efc100 ef={ef}", {"ef": max(ef, cfg.k)}) for ef in cfg.hnsw_efs or (cfg.k,)]
    milvus_collection(client, "items", x, cat.store, schema, index)
    build = time.perf_counter() - t0
    bytes_per_item = _disk_bytes(Path(tmp.name)) / n

    def searcher(params: dict) -> Searcher:
        def query(q: np.ndarray, expr: str) -> list[list[int]]:
            hits = client.search(
                "items",
                data=[v.tolist() for v in q],
                limit=cfg.k,
                filter=expr,
                search_params={"metric_type": "IP", "params": params},
                output_fields=[_ID],
                consistency_level="Eventually",
            )
            return [[hit["id"] for hit in row] for row in hits]

        def search(q: np.ndarray, filters: list[str]) -> np.ndarray:
            if len(set(filters)) == 1:
                rows = query(q, translate_filter(filters[0], schema, "milvus"))
            else:
                rows = [
                    query(q[i : i + 1], translate_filter(flt, schema, "milvus"))[0] for i, flt in enumerate(filters)
                ]
            return np.stack([_pad(r, cfg.k) for r in rows])

        search.workdir = tmp  # type: ignore[attr-defined]  # the database file lives as long as the searcher
        return search

    return [("milvus", config, build, bytes_per_item, searcher(params)) for config, params in settings]


#: peer name → the function building its systems.
PEERS: dict[str, Callable] = {"lancedb": lancedb_systems, "milvus": milvus_systems}
