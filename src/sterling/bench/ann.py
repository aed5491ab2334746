"""``sterling bench ann``: filtered top-k search, sterling against FAISS and hnswlib in one run.

Data: a structured catalogue (the recipe of ``faiss.contrib.datasets.SyntheticDataset``: a
10-dimensional manifold in D dimensions; i.i.d. random vectors, or one dominant Gaussian blob, make
every partition index look useless) with attributes whose filters pass about 50%, 10% and 1% of the
items, independent of the embeddings (the hard case for partition indexes, as a random bitmap is).
Queries come from the same distribution. Each query carries **its
own filter** (``per_query``, as real per-user filters do) or the batch shares one (``shared``).

Ground truth is the exact filtered top-k (brute force). Every row reports recall@k against it,
queries per second at batch 1 and at the batch size (the median of up to 5 timed passes, see
``_timed_qps``), the median batch-1 latency, build time and index bytes per item. Sterling's rows
add the roofline (:mod:`sterling.bench.roofline`): the int8 operations and bytes their scan does
per second, beside an int8 GEMM's and a memory read's peak measured at the start of the run.

Systems (peers need the ``[bench]`` extra; a missing peer is skipped and said so):

* ``faiss-flat``: ``IndexFlatIP`` + ``IDSelectorBitmap`` (BLAS forced: ``distance_compute_blas_threshold``).
* ``faiss-ivf-sq8``: ``IVF{nlist},SQ8`` + ``IDSelectorBitmap`` at several nprobe.
* ``faiss-prefilter``: gather the passing items, ``IndexFlatIP`` over them.
* ``hnswlib``: HNSW (M 16, ef_construction 200) with a filter function, at several ef.
* ``lancedb``: LanceDB, IVF-PQ with refine at 1M items, HNSW-SQ below; ``prefilter`` where clauses.
* ``milvus``: Milvus Lite (a local file), IVF_SQ8 at 1M items, HNSW below; ``filter=`` expressions.
  Both are :mod:`sterling.bench.peers`: one call per query for per-query filters, one per batch
  when the batch shares its filter.
* ``sterling``: :class:`~sterling.ItemIndex` (IVF + int8 + Bloom with the planner of
  :mod:`sterling.index.segment`) at several nprobe, and at ``nprobe = nlist`` (exact).

FAISS applies one selector to a whole ``search`` call, so per-query filters cost it one call per
distinct filter; that is the price a FAISS user pays for them, and the table shows it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from sterling.bench.peers import PEERS
from sterling.bench.report import Benchmark, comma_list, write_json
from sterling.bench.roofline import measure_peaks, scan_work
from sterling.index.attributes import AttributeStore
from sterling.index.config import auto_nlist
from sterling.index.item_index import IndexConfig, ItemIndex
from sterling.testing.embeddings import structured

__all__ = ["AnnBenchConfig", "Catalogue", "make_catalogue", "run"]

_TRUTH_ROWS = 1 << 20  # passing rows scored at a time by the ground truth

#: every system the benchmark knows, in the order they run (the default ``--systems``).
SYSTEMS = ("faiss", "hnswlib", "sterling", "lancedb", "milvus")

#: selectivity label → (feature, number of equally likely values): one value passes 1/values.
SELECTIVITY_FEATURES = {"50%": ("half", 2), "10%": ("tenth", 10), "1%": ("hundredth", 100)}


@dataclass(frozen=True)
class AnnBenchConfig:
    """Sizes of one benchmark run.

    Args:
        n (int): catalogue size. d (int): dimension. k (int): results per query.
        queries (int): queries with ground truth. batch (int): the large batch size.
        batch1_queries (int): queries timed one at a time.
        nlist (int): FAISS IVF lists. nprobes (tuple): FAISS IVF probes.
        hnsw_efs (tuple): hnswlib ef values (empty: skip hnswlib).
        seed (int): data seed.
    """

    n: int = 1_000_000
    d: int = 64
    k: int = 100
    queries: int = 256
    batch: int = 256
    batch1_queries: int = 32
    nlist: int = 1024
    nprobes: tuple[int, ...] = (16, 32, 48, 64, 128, 256)
    hnsw_efs: tuple[int, ...] = (200, 800)
    seed: int = 0

    @classmethod
    def quick(cls) -> AnnBenchConfig:
        return cls(n=100_000, queries=128, batch=128, batch1_queries=16, nlist=256, nprobes=(16, 64), hnsw_efs=(200,))


@dataclass(frozen=True)
class Catalogue:
    """Embeddings, attributes and queries with per-query filters, from one dataset."""

    dataset: str
    embeddings: np.ndarray  # float32 [N, D]
    attributes: list[dict]  # N dicts: {"half": "h1", "tenth": "t7", "hundredth": "u42"}
    store: AttributeStore  # the same attributes, for exact filter evaluation
    queries: np.ndarray  # float32 [Q, D]
    filters: dict[str, list[str]]  # selectivity label → Q filter strings


def make_catalogue(cfg: AnnBenchConfig) -> Catalogue:
    """A structured catalogue (:func:`structured`) with independent attributes, and queries from
    the same distribution with per-query filters."""
    rng = np.random.default_rng(cfg.seed)
    x = structured(rng, cfg.n + cfg.queries, cfg.d)
    x, q = x[: cfg.n], x[cfg.n :]
    codes = {f: rng.integers(0, values, cfg.n) for f, values in SELECTIVITY_FEATURES.values()}
    prefix = {f: f[0] for f, _ in SELECTIVITY_FEATURES.values()}
    names = {
        f: np.array([f"{prefix[f]}{v}" for v in range(values)], dtype=object)
        for f, values in SELECTIVITY_FEATURES.values()
    }
    columns = {f: names[f][codes[f]].tolist() for f in codes}
    attributes = [dict(zip(columns, values)) for values in zip(*columns.values())]
    filters = {
        label: [f"{f}:{prefix[f]}{v}" for v in rng.integers(0, values, cfg.queries)]
        for label, (f, values) in SELECTIVITY_FEATURES.items()
    }
    return Catalogue("synthetic", x, attributes, AttributeStore.build(attributes), q.astype(np.float32), filters)


def movielens_catalogue(src: Path, cfg: AnnBenchConfig, log=print) -> Catalogue:
    """Item embeddings of a two-tower model trained for one epoch on MovieLens ``src``, the
    items' attributes (``genre`` list, ``year``), user embeddings of random users' timelines as
    queries, and per-query filters drawn from genre terms, their negations and year ranges whose
    exact selectivity is within 2x of 50%, 10% and 1%."""
    import pyarrow.parquet as pq

    from sterling.data.movielens import load_movielens
    from sterling.data.schema import TIMELINE_ITEM_ID, DatasetPaths
    from sterling.retrieval.publish import load_model, publish
    from sterling.train.loop import TrainConfig, train

    rng = np.random.default_rng(cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        data = load_movielens(src, Path(tmp) / "data")
        report = train(data, Path(tmp) / "checkpoint", TrainConfig(epochs=1, overarch=None), log=lambda _: None)
        rec = load_model(publish(report.checkpoint, DatasetPaths(data).items, Path(tmp) / "snapshot"))
        timelines = pq.read_table(DatasetPaths(data).users, columns=[TIMELINE_ITEM_ID]).column(0).to_pylist()
    ids = rec.index.ids
    x = rec.index.embeddings_of(ids).numpy()
    attributes = rec.index.attributes_of(ids)
    store = AttributeStore.build(attributes)
    users = rng.choice(len(timelines), cfg.queries, replace=len(timelines) < cfg.queries)
    with torch.no_grad():
        _, queries = rec.encode(rec.inputs([timelines[u] for u in users]))
    q = queries[:, rec.config.primary].numpy().astype(np.float32)
    genres = sorted({g for a in attributes for g in a.get("genre", [])})
    years = sorted({a["year"] for a in attributes if "year" in a})
    candidates = [f'genre:"{g}"' for g in genres] + [f'NOT genre:"{g}"' for g in genres]
    candidates += [f"year >= {lo} AND year <= {hi}" for lo in years[::2] for hi in years[::2] if lo <= hi]
    share = {c: float(store.evaluate_filter(c).float().mean()) for c in candidates}
    filters = {}
    for label, target in (("50%", 0.5), ("10%", 0.1), ("1%", 0.01)):
        near = [c for c in candidates if target / 2 <= share[c] <= 2 * target]
        if near:
            filters[label] = [near[i] for i in rng.integers(0, len(near), cfg.queries)]
    log(
        f"movielens: {len(x):,} items, {len(genres)} genres, filters per selectivity: "
        + ", ".join(f"{k}: {len(set(v))} distinct" for k, v in filters.items())
    )
    return Catalogue(f"movielens:{Path(src).name}", x, attributes, store, q, filters)


def passing(cat: Catalogue, flt: str) -> np.ndarray:
    """bool [N]: the items that pass ``flt`` (exact)."""
    return cat.store.evaluate_filter(flt).numpy()


def ground_truth(cat: Catalogue, filters: list[str], k: int) -> list[set[int]]:
    """Exact filtered top-k id sets per query: the passing rows of each distinct filter gathered
    once and scored against all its queries (brute force)."""
    x = torch.from_numpy(cat.embeddings)
    q = torch.from_numpy(cat.queries)
    out: list[set[int]] = [set() for _ in filters]
    groups: dict[str, list[int]] = {}
    for i, flt in enumerate(filters):
        groups.setdefault(flt, []).append(i)
    for flt, members in groups.items():
        rows = torch.from_numpy(np.flatnonzero(passing(cat, flt)))
        best_s = torch.full((len(members), 0), float("-inf"))
        best_r = torch.zeros((len(members), 0), dtype=torch.int64)
        for start in range(0, len(rows), _TRUTH_ROWS):  # [M, chunk] scores at a time (10M items)
            chunk = rows[start : start + _TRUTH_ROWS]
            top = torch.topk(q[members] @ x[chunk].T, min(k, len(chunk)), dim=1)  # the chunk's best
            scores = torch.cat([best_s, top.values], 1)
            found = torch.cat([best_r, chunk[top.indices]], 1)
            best = torch.topk(scores, min(k, scores.shape[1]), dim=1)  # merged with the earlier winners
            best_s, best_r = best.values, found.gather(1, best.indices)
        for i, picked in zip(members, best_r.tolist()):
            out[i] = set(picked)
    return out


def recall(found: np.ndarray, truth: list[set[int]], k: int) -> float:
    return float(np.mean([len(set(r[:k].tolist()) & t) / max(len(t), 1) for r, t in zip(found, truth)]))


# A searcher takes (queries [B, D], filters: B strings) and returns item rows int64 [B, k].
Searcher = Callable[[np.ndarray, list[str]], np.ndarray]


def _timed_qps(
    search: Searcher,
    cat: Catalogue,
    filters: list[str],
    batch: int,
    limit: int,
    budget_s: float = 1.0,
    max_passes: int = 5,
) -> tuple[float, np.ndarray]:
    """Queries per second over the first ``limit`` queries in batches of ``batch``, and the results.

    The pass is repeated while the passes so far took under ``budget_s`` (at most ``max_passes``)
    and the median pass is reported: a single pass of a fast system lasts a few milliseconds, where
    one scheduler hiccup on a shared machine moves the figure by tens of percent."""
    passes = []
    while not passes or (len(passes) < max_passes and sum(passes) < budget_s):
        results = []
        t0 = time.perf_counter()
        for s in range(0, limit, batch):
            end = min(s + batch, limit)
            results.append(search(cat.queries[s:end], filters[s:end]))
        passes.append(time.perf_counter() - t0)
    return limit / float(np.median(passes)), np.concatenate(results)


def _batch1(
    search: Searcher, cat: Catalogue, filters: list[str], limit: int, budget_s: float = 1.0
) -> tuple[float, float]:
    """Queries per second and the median latency (ms) of the first ``limit`` queries searched one at
    a time, each call timed (passes repeated as in :func:`_timed_qps`)."""
    search(cat.queries[:1], filters[:1])  # first-call costs (compilation, caches) are not latency
    latencies: list[float] = []
    while not latencies or (len(latencies) < 5 * limit and sum(latencies) < budget_s):
        for i in range(limit):
            t0 = time.perf_counter()
            search(cat.queries[i : i + 1], filters[i : i + 1])
            latencies.append(time.perf_counter() - t0)
    return len(latencies) / sum(latencies), 1e3 * float(np.median(latencies))


def _faiss_systems(cat: Catalogue, cfg: AnnBenchConfig) -> list[tuple[str, str, float, float, Searcher]]:
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    faiss.cvar.distance_compute_blas_threshold = 1  # force BLAS (DESIGN "Known traps")
    x = cat.embeddings
    systems = []

    def bitmap(flt: str) -> faiss.IDSelectorBitmap:
        bits = np.packbits(passing(cat, flt), bitorder="little")
        sel = faiss.IDSelectorBitmap(len(x), faiss.swig_ptr(bits))
        sel.bits_ref = bits  # keep the buffer alive as long as the selector
        return sel

    def grouped(index, params_for: Callable[[str], object]) -> Searcher:
        def search(q: np.ndarray, filters: list[str]) -> np.ndarray:
            out = np.empty((len(q), cfg.k), dtype=np.int64)
            for flt in dict.fromkeys(filters):
                rows = [i for i, f in enumerate(filters) if f == flt]
                out[rows] = index.search(q[rows], cfg.k, params=params_for(flt))[1]
            return out

        return search

    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(cat.embeddings.shape[1])
    flat.add(x)
    systems.append(
        (
            "faiss-flat",
            "IndexFlatIP+bitmap",
            time.perf_counter() - t0,
            4.0 * x.shape[1] + 1 / 8,
            grouped(flat, lambda f: faiss.SearchParameters(sel=bitmap(f))),
        )
    )

    t0 = time.perf_counter()
    ivf = faiss.index_factory(x.shape[1], f"IVF{cfg.nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
    ivf.train(x[np.random.default_rng(1).choice(len(x), min(len(x), 64 * cfg.nlist), replace=False)])
    ivf.add(x)
    build = time.perf_counter() - t0
    ivf_bytes = (faiss.serialize_index(ivf).nbytes) / len(x) + 1 / 8
    for nprobe in cfg.nprobes:
        systems.append(
            (
                "faiss-ivf-sq8",
                f"IVF{cfg.nlist},SQ8 nprobe={nprobe}+bitmap",
                build,
                ivf_bytes,
                grouped(ivf, lambda f, p=nprobe: faiss.SearchParametersIVF(sel=bitmap(f), nprobe=p)),
            )
        )

    def prefilter(q: np.ndarray, filters: list[str]) -> np.ndarray:
        out = np.full((len(q), cfg.k), -1, dtype=np.int64)
        for flt in dict.fromkeys(filters):
            rows = [i for i, f in enumerate(filters) if f == flt]
            keep = np.flatnonzero(passing(cat, flt))
            sub = faiss.IndexFlatIP(x.shape[1])
            sub.add(x[keep])
            found = sub.search(q[rows], cfg.k)[1]
            out[rows] = np.where(found >= 0, keep[np.maximum(found, 0)], -1)
        return out

    systems.append(("faiss-prefilter", "gather passing + IndexFlatIP", 0.0, 4.0 * x.shape[1] + 1 / 8, prefilter))
    return systems


def _hnsw_systems(cat: Catalogue, cfg: AnnBenchConfig) -> list[tuple[str, str, float, float, Searcher]]:
    import hnswlib

    x = cat.embeddings
    t0 = time.perf_counter()
    index = hnswlib.Index(space="ip", dim=x.shape[1])
    index.init_index(max_elements=len(x), M=16, ef_construction=200, random_seed=cfg.seed)
    index.set_num_threads(torch.get_num_threads())
    index.add_items(x, np.arange(len(x)))
    build = time.perf_counter() - t0
    bytes_per_item = 4.0 * x.shape[1] + 16 * 2 * 4 + 8 + 1 / 8

    def searcher(ef: int) -> Searcher:
        def search(q: np.ndarray, filters: list[str]) -> np.ndarray:
            index.set_ef(max(ef, cfg.k))
            out = np.full((len(q), cfg.k), -1, dtype=np.int64)
            for i, flt in enumerate(filters):
                ok = passing(cat, flt)
                out[i, : min(cfg.k, int(ok.sum()))] = _hnsw_filtered(index, q[i], ok, cfg.k)
            return out

        return search

    return [("hnswlib", f"HNSW M16 ef={ef} + filter fn", build, bytes_per_item, searcher(ef)) for ef in cfg.hnsw_efs]


def _hnsw_filtered(index, query: np.ndarray, ok: np.ndarray, k: int) -> np.ndarray:
    """hnswlib's filtered top-k of one query ``[D]`` (``ok``: bool ``[N]``, the passing rows): as
    many as it finds, up to ``k`` and the number passing. hnswlib raises a RuntimeError rather than
    answer fewer than it was asked for, which a filter passing fewer than ``k`` items (1% of
    MovieLens' 3,883 movies is 39) always does; so it is asked for at most as many as pass, and for
    half as many again each time it finds fewer (its graph search may miss passing items)."""
    want = min(k, int(ok.sum()))
    while want > 0:
        try:
            labels, _ = index.knn_query(query[None], k=want, filter=lambda j: bool(ok[j]))
            return labels[0].astype(np.int64)
        except RuntimeError:
            want //= 2
    return np.zeros(0, dtype=np.int64)


def _sterling_systems(cat: Catalogue, cfg: AnnBenchConfig) -> list[tuple[str, str, float, float, Searcher]]:
    t0 = time.perf_counter()
    index = ItemIndex.build(cat.embeddings, cat.attributes, config=IndexConfig(nlist=cfg.nlist))
    build = time.perf_counter() - t0
    nlist = index.config.nlist

    def searcher(nprobe: int) -> Searcher:
        def search(q: np.ndarray, filters: list[str]) -> np.ndarray:
            return index.search(torch.from_numpy(q), k=cfg.k, filter=filters, nprobe=nprobe).ids.numpy()

        search.work = lambda q, filters: scan_work(index, torch.from_numpy(q), filters, cfg.k, nprobe)
        return search

    bytes_per_item = index.nbytes() / len(index)
    return [
        (
            "sterling",
            f"IVF{nlist} int8+Bloom nprobe={p}" if p < nlist else f"IVF{nlist} int8+Bloom exact",
            build,
            bytes_per_item,
            searcher(p),
        )
        for p in (*cfg.nprobes, nlist)
    ]


def machine() -> dict:
    """A description of the machine and library versions."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:
        pass
    for package in ("hnswlib", "lancedb", "pymilvus", "milvus-lite"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return info


#: MovieLens data looked for by default (``--movielens`` overrides; absent: the dataset is skipped).
DEFAULT_MOVIELENS = Path(os.environ.get("STERLING_DATA", "/work/shared/data")) / "ml-1m-subset"


def run(
    cfg: AnnBenchConfig,
    modes: tuple[str, ...] = ("per_query", "shared"),
    log=print,
    movielens: Path | None = None,
    synthetic: bool = True,
    systems: tuple[str, ...] = SYSTEMS,
) -> dict:
    """Run the benchmark on the synthetic catalogue and, given ``movielens``, on MovieLens item
    embeddings; returns ``{"machine": ..., "config": ..., "peaks": ..., "rows": [...], "skipped":
    [...]}``. The peaks (:func:`sterling.bench.roofline.measure_peaks`) are measured first, on the
    same threads the systems get; the machine record ends with the run's peak resident memory."""
    peaks = measure_peaks()
    log(f"peaks: int8 GEMM {peaks.int8_gops:,.0f} GOP/s, memory read {peaks.read_gbps:,.1f} GB/s")
    runs = []
    if synthetic:
        log(f"catalogue: {cfg.n:,} × {cfg.d} (structured), {cfg.queries} queries, k={cfg.k}")
        runs.append((make_catalogue(cfg), cfg))
    if movielens is not None:
        cat = movielens_catalogue(movielens, cfg, log)
        nlist = max(1, 2 ** round(math.log2(math.sqrt(len(cat.embeddings) / 4))))
        small = replace(
            cfg,
            n=len(cat.embeddings),
            d=cat.embeddings.shape[1],
            nlist=nlist,
            nprobes=tuple(sorted({max(1, nlist // 16), max(1, nlist // 8), max(1, nlist // 4)})),
        )
        runs.append((cat, small))
    rows, skipped = [], []
    for cat, run_cfg in runs:
        built = []
        makers = {"faiss": _faiss_systems, "hnswlib": _hnsw_systems, "sterling": _sterling_systems, **PEERS}
        for name, make in makers.items():
            if name not in systems or (name == "hnswlib" and not run_cfg.hnsw_efs):
                continue
            try:
                t0 = time.perf_counter()
                built += make(cat, run_cfg)
                log(f"{cat.dataset}: built {name} in {time.perf_counter() - t0:.1f}s")
            except ImportError as e:
                skipped.append(f"{name}: {e} (pip install 'sterling[bench]')")
                log(f"skipping {name}: {e}")
        rows += _measure(cat, run_cfg, built, modes, log)
    info = {**machine(), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    return {
        "machine": info,
        "config": asdict(cfg),
        "peaks": asdict(peaks),
        "rows": rows,
        "skipped": sorted(set(skipped)),
    }


def _measure(cat: Catalogue, cfg: AnnBenchConfig, systems: list, modes: tuple[str, ...], log) -> list[dict]:
    rows = []
    for label, per_query in cat.filters.items():
        for mode in modes:
            filters = per_query if mode == "per_query" else [per_query[0]] * cfg.queries
            truth = ground_truth(cat, filters, cfg.k)
            for system, config, build_s, bytes_per_item, search in systems:
                few = min(cfg.batch1_queries, cfg.queries)
                # hnswlib calls a Python filter function per visited node, and a Milvus Lite call
                # costs tens of milliseconds (60 at 100k items): time them on fewer queries.
                limit = few if system in ("hnswlib", "milvus") else cfg.queries
                qps1, p50 = _batch1(search, cat, filters, few)
                qps, found = _timed_qps(search, cat, filters, cfg.batch, limit)
                row = {
                    "dataset": cat.dataset,
                    "system": system,
                    "config": config,
                    "selectivity": label,
                    "filter_mode": mode,
                    "batch": cfg.batch,
                    "k": cfg.k,
                    "queries": limit,
                    "recall": recall(found, truth[:limit], cfg.k),
                    "qps": qps,
                    "qps_batch1": qps1,
                    "p50_batch1_ms": p50,
                    "build_s": build_s,
                    "bytes_per_item": bytes_per_item,
                }
                work = getattr(search, "work", None)
                if work is not None:  # the roofline: achieved int8 operations and bytes per second
                    done = [
                        work(cat.queries[s : s + cfg.batch], filters[s : s + cfg.batch])
                        for s in range(0, limit, cfg.batch)
                    ]
                    row["int8_gops"] = sum(w.ops for w in done) * qps / limit / 1e9
                    row["read_gbps"] = sum(w.bytes for w in done) * qps / limit / 1e9
                rows.append(row)
                log(
                    f"{cat.dataset[:12]:<12} {label:>4} {mode:<9} {system:<16} {config:<34} recall {row['recall']:.3f}  "
                    f"qps@{cfg.batch} {qps:9,.0f}  qps@1 {qps1:8,.0f}  p50@1 {p50:6.2f} ms"
                )
    return rows


def format_table(result: dict) -> str:
    """The rows as a fixed-width table; sterling rows add the roofline: achieved int8 GOP/s and
    GB/s, each with its share of the run's measured peak."""
    peaks = result.get("peaks") or {}
    head = (
        f"{'dataset':<12}  {'sel':>4}  {'mode':<9}  {'system':<16}  {'config':<34}  {'recall':>6}  {'qps@B':>9}  "
        f"{'qps@1':>8}  {'p50@1 ms':>8}  {'build_s':>7}  {'B/item':>7}  {'int8 GOP/s':>14}  {'GB/s':>12}"
    )
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        roof = ""
        if "int8_gops" in r and peaks:
            gops, gbps = r["int8_gops"], r["read_gbps"]
            roof = (
                f"  {gops:6,.0f} ({100 * gops / peaks['int8_gops']:3.0f}%)"
                f"  {gbps:4.1f} ({100 * gbps / peaks['read_gbps']:3.0f}%)"
            )
        lines.append(
            f"{r['dataset'][:12]:<12}  {r['selectivity']:>4}  {r['filter_mode']:<9}  {r['system']:<16}  {r['config']:<34}  "
            f"{r['recall']:6.3f}  {r['qps']:9,.0f}  {r['qps_batch1']:8,.0f}  {r.get('p50_batch1_ms', float('nan')):8.2f}  "
            f"{r['build_s']:7.1f}  {r['bytes_per_item']:7.1f}{roof}"
        )
    if peaks:
        lines.append(f"peaks: int8 GEMM {peaks['int8_gops']:,.0f} GOP/s, memory read {peaks['read_gbps']:,.1f} GB/s")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Recall against QPS: a row of panels per dataset and filter mode (one per selectivity, the
    row's axes shared), each system in one colour throughout, at the run's batch size (solid) and at
    batch 1 (dashed), and one legend for the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    runs = result["rows"]
    lines = sorted({(r["dataset"], r["filter_mode"]) for r in runs})
    selectivities = sorted({r["selectivity"] for r in runs}, key=lambda s: -float(s.rstrip("%")))
    systems = list(dict.fromkeys(r["system"] for r in runs))
    colours = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(systems)}
    batch = runs[0]["batch"] if runs else 0
    fig, axes = plt.subplots(
        len(lines),
        len(selectivities),
        figsize=(4.2 * len(selectivities), 3.2 * len(lines) + 0.8),
        squeeze=False,
        sharex="row",
        sharey="row",
        constrained_layout=True,
    )
    for row, (dataset, mode) in enumerate(lines):
        for col, sel in enumerate(selectivities):
            ax = axes[row, col]
            for system in systems:
                mine = [
                    r
                    for r in runs
                    if (r["dataset"], r["filter_mode"], r["selectivity"], r["system"]) == (dataset, mode, sel, system)
                ]
                for key, style in (("qps", "-"), ("qps_batch1", "--")):
                    pts = sorted(((r[key], r["recall"]) for r in mine), key=lambda xy: (xy[1], -xy[0]))
                    if pts:
                        ax.plot(*zip(*pts), style, marker="o", markersize=3, color=colours[system])
            ax.set_xscale("log")
            ax.set_title(f"{dataset} · {mode} · {sel} pass", fontsize=8)
            ax.tick_params(labelsize=7)
            if row == len(lines) - 1 or col == 0:
                ax.set_xlabel("queries / s", fontsize=8)
            if col == 0:
                ax.set_ylabel("recall@k", fontsize=8)
    handles = [Line2D([], [], color=colours[s], marker="o", label=s) for s in systems] + [
        Line2D([], [], color="grey", linestyle="-", label=f"batch {batch}"),
        Line2D([], [], color="grey", linestyle="--", label="batch 1"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize=8)
    fig.savefig(path, dpi=110)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quick",
        action="store_true",
        help="100k items, fewer configurations (2-2.5 min on 2 cores, measured 134 s: 11-16 s of it the hnswlib "
        "build, 14 s LanceDB's, 26 s Milvus Lite's; 51 s without lancedb and milvus)",
    )
    p.add_argument(
        "--n", type=int, help="catalogue size (default 1,000,000; 100,000 with --quick); the IVF lists follow (√n)"
    )
    p.add_argument("--nprobes", help="comma-separated IVF probe counts (default 16,32,48,64,128,256)")
    p.add_argument("--json", dest="json_path", help="write the rows and the machine here")
    p.add_argument("--plot", help="write a recall/QPS plot (PNG) here")
    p.add_argument("--mode", choices=["per_query", "shared", "both"], default="both")
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {', '.join(SYSTEMS)} (hnswlib builds 1M items in ~10 min; "
        "lancedb and milvus are LanceDB and Milvus Lite, skipped when not installed)",
    )
    p.add_argument(
        "--movielens",
        type=Path,
        default=None,
        help=f"MovieLens folder for the real-embedding rows (default {DEFAULT_MOVIELENS} when present; 'none' to skip)",
    )


def cli(args: argparse.Namespace) -> int:
    cfg = AnnBenchConfig.quick() if args.quick else AnnBenchConfig()
    if args.n:
        cfg = replace(cfg, n=args.n, nlist=auto_nlist(args.n))
    if args.nprobes:
        nprobes = comma_list(args.nprobes, "--nprobes", int)
        if min(nprobes) < 1:
            raise ValueError(f"--nprobes takes probe counts >= 1, got {args.nprobes!r}")
        cfg = replace(cfg, nprobes=nprobes)
    modes = ("per_query", "shared") if args.mode == "both" else (args.mode,)
    movielens = args.movielens
    if movielens is None and DEFAULT_MOVIELENS.is_dir():
        movielens = DEFAULT_MOVIELENS
    systems = comma_list(args.systems, "--systems")
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise ValueError(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    result = run(
        cfg, modes, movielens=None if movielens is None or str(movielens) == "none" else movielens, systems=systems
    )
    print(format_table(result))
    write_json(args.json_path, result)
    if args.plot:
        plot(result, Path(args.plot))
        print(f"wrote the recall/QPS plot to {args.plot}")
    return 0


BENCHMARK = Benchmark(
    "ann",
    "filtered top-k: sterling vs FAISS (flat, IVF-SQ8, pre-filter), hnswlib, LanceDB and Milvus Lite",
    add_arguments,
    cli,
)
