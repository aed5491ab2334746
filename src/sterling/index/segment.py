"""SilverTorch search over one cluster-sorted segment: plan → probe → partial Bloom → int8 scan →
verify → top-k (spec ``silvertorch.md`` §4, Algorithm 1), with a fallback the paper lacks.

A :class:`Segment` holds N items *in IVF order* (items of a cluster are contiguous rows): int8 codes
with one scale per item, the external ids, centroids and list offsets, the exact attribute store
and the Bloom index in the same row order. It keeps no float copy of the embeddings: scores are
inner products with the stored vectors ``codes * scale``, and "exact" below means exact with
respect to those vectors.

**Planner** (:mod:`sterling.index.planner`): each distinct filter of a batch is compiled once
(cached), given a selectivity estimate and answered by an IVF probe of some lists, a scan of all
lists, gathering its passing rows (pre-filtering), or nothing at all (a constant-false filter).

**Scan** (:func:`sterling.ops.ivf_scan.ivf_scan`, one fused kernel per batch): for every probed
cluster, the query's plan program over the cluster's Bloom words only (the partial mask of
Algorithm 1), ANDed with the live rows, then the inner products of the float query with the
surviving rows' int8 codes (times their scales) into a running top-k. The query is not quantized:
on CPU this costs nothing and leaves no query-quantization error, so no float re-scoring pass is
needed (the result already ranks by the inner product with the stored vectors).

**Verify.** Unless the Bloom plan is exact, the kernel keeps ``k`` times the estimated ratio of
Bloom-passing to truly passing rows as candidates, and they are checked against the exact
attribute store (Bloom false positives dropped; NOT never drops a passing row, see
:mod:`sterling.index.bloom`); the k best survivors are kept.

**Selective filters never starve the result.** A query left with fewer than k results is searched
again with 4× the probes, and at ``nlist`` probes every passing live row is a candidate, so no
query returns fewer than ``min(k, #passing live rows)`` results; with ``nprobe >= nlist`` the
result is the exact filtered top-k (up to ties).

**Plan, then execute.** :meth:`Segment.plan_probes` is the planner alone: each query's first probe
count, a gathered filter counting as a scan of all lists (both are exact). With the rows each
filter passes (:meth:`Segment.filter_words`) and the segment's tensors
(:meth:`Segment.executor_tensors`), it drives
:func:`sterling.ops.reference.masked_ivf_topk.masked_ivf_topk`, the same search (probes, widening,
exact top-k) as static-shape tensor ops that ``torch.export`` traces
(:meth:`sterling.index.item_index.ItemIndex.plan`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sterling.index.attributes import AttributeStore
from sterling.index.bloom import BloomIndex
from sterling.index.config import IndexConfig, auto_nlist
from sterling.index.id_map import IdMap
from sterling.index.ivf import IVFLayout, kmeans
from sterling.index.planner import CompiledFilter, FilterPlan, compile_filter, plan_batch
from sterling.index.quant import Int8Codes, quantize
from sterling.ops.int8_topk import int8_topk
from sterling.ops.ivf_scan import Kernel, encode, ivf_scan, list_bounds
from sterling.ops.nearest_lists import nearest_lists
from sterling.ops.plan_program import PlanProgram, bit_of, pack_rows

__all__ = ["Segment"]

_PLAN_CACHE_SIZE = 4096
_WORDS_CACHE_SIZE = 256  # filter_words entries: N / 8 bytes each (32 MiB at a million rows)
_BATCH_CACHE_SIZE = 256  # batch plans and scan programs, by the batch's filters
_CACHED_BATCH = 16  # queries of the batches whose plans are cached: a request's few queries, which a
# serving loop repeats (planning one costs tens of microseconds); a batch of many users' filters rarely
# repeats, and caching it would flatter a benchmark that searches the same batch again and again


def _remember(cache: dict, key: Any, limit: int, make: Callable[[], Any]) -> Any:
    """``cache[key]``, made by ``make()`` on a miss (a key of None: made, not kept); a full cache is
    emptied first."""
    if key is None:
        return make()
    value = cache.get(key)
    if value is None:
        if len(cache) >= limit:
            cache.clear()
        value = cache[key] = make()
    return value


def _batch_key(filters: list[str | None], *more: Any) -> tuple | None:
    """The cache key of a batch's plans: its filters (and ``more``), None for a large batch."""
    return (tuple(filters), *more) if len(filters) <= _CACHED_BATCH else None


@dataclass(frozen=True)
class _ScanProgram:
    """What the scan of a batch reads of its filters (:meth:`Segment._search`)."""

    program: PlanProgram  # the plans of the distinct filters that are not constant true
    plan_of: torch.Tensor  # int64 [B]: each query's plan, -1 for none
    factor: float  # candidates kept per result: a typical filter's (upper quartile), at most 4


def _upper_quartile(values: list[float]) -> float:
    """``np.quantile(values, 0.75)`` (linear interpolation) for a short list, without numpy's
    tens of microseconds per call."""
    ordered = sorted(values)
    at = 0.75 * (len(ordered) - 1)
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def _scan_program(filters: list[str | None], compiled: dict[str | None, CompiledFilter | None]) -> _ScanProgram:
    """The plan program of a batch's distinct filters and each query's plan; the candidate factor
    is a typical filter's, not the outliers' (a starved query is scanned again)."""
    used = [e for e in dict.fromkeys(filters) if e is not None and compiled[e].plan.constant is not True]
    slot = {e: i for i, e in enumerate(used)}
    return _ScanProgram(
        encode([compiled[e].plan for e in used]),
        torch.tensor([slot.get(e, -1) for e in filters], dtype=torch.int64),
        min(4.0, _upper_quartile([1.0] + [compiled[e].candidates_factor() for e in used])),
    )


@dataclass(frozen=True)
class Segment:
    """N items in IVF order, searchable with filters.

    Attributes:
        codes (Int8Codes): int8 [N, D] codes and float32 [N] scales, in IVF order.
        ids (torch.Tensor): int64 [N], the external id of every row.
        centroids (torch.Tensor): float32 [nlist, D].
        list_offsets (torch.Tensor): int64 [nlist + 1]; cluster c is rows ``offsets[c]:offsets[c+1]``.
        attributes (AttributeStore): exact attributes, in IVF order.
        bloom (BloomIndex): the Bloom index, in IVF order.
        sample (torch.Tensor): int64 [S], random Bloom word columns: selectivities are estimated on
            their rows (whole words, which is what the Bloom pass reads).
        config (IndexConfig): how it was built.
    """

    codes: Int8Codes
    ids: torch.Tensor
    centroids: torch.Tensor
    list_offsets: torch.Tensor
    attributes: AttributeStore
    bloom: BloomIndex
    sample: torch.Tensor
    config: IndexConfig
    _filters: dict[str, CompiledFilter] = field(default_factory=dict, init=False, repr=False, compare=False)
    _words: dict[str | None, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)
    _plans: dict[tuple, dict[str | None, FilterPlan]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _programs: dict[tuple, _ScanProgram] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def build(
        cls,
        embeddings: torch.Tensor,
        attributes: AttributeStore,
        ids: torch.Tensor | None = None,
        config: IndexConfig = IndexConfig(),
        centroids: torch.Tensor | None = None,
    ) -> Segment:
        """Clusters ``embeddings`` (float [N, D]; k-means unless ``centroids`` [nlist, D] are
        given), sorts everything by cluster, quantizes, indexes. ``ids`` default to arange(N)."""
        n = embeddings.shape[0]
        ids = torch.arange(n) if ids is None else ids
        if len(attributes) != n or len(ids) != n:
            raise ValueError(f"{n} embeddings, {len(ids)} ids and {len(attributes)} attribute rows")
        if centroids is None:
            nlist = min(config.nlist or auto_nlist(n), max(n, 1))
            if nlist > 1:
                centroids = kmeans(embeddings, nlist, iters=config.kmeans_iters, seed=config.seed)
            else:
                centroids = (embeddings.mean(0, keepdim=True) if n else torch.zeros(1, embeddings.shape[1])).float()
        layout = (
            IVFLayout.from_centroids(centroids, embeddings)
            if n
            else IVFLayout(
                centroids, torch.zeros(0, dtype=torch.int64), torch.zeros(len(centroids) + 1, dtype=torch.int64)
            )
        )
        order = layout.order
        return cls.from_sorted(
            quantize(embeddings[order].float(), per_item=True),
            ids[order],
            layout.centroids,
            layout.list_offsets,
            attributes.take(order),
            config,
        )

    @classmethod
    def from_sorted(
        cls,
        codes: Int8Codes,
        ids: torch.Tensor,
        centroids: torch.Tensor,
        list_offsets: torch.Tensor,
        attributes: AttributeStore,
        config: IndexConfig,
        bloom: BloomIndex | None = None,
    ) -> Segment:
        """A segment from parts already in IVF order (builds the Bloom index unless given)."""
        n = len(codes)
        gen = torch.Generator().manual_seed(config.seed)
        sample = torch.randperm((n + 63) // 64, generator=gen)[: -(-config.sample_size // 64)].sort().values
        return cls(
            codes,
            ids,
            centroids,
            list_offsets,
            attributes,
            bloom if bloom is not None else BloomIndex.build(attributes, config=config.bloom),
            sample,
            config,
        )

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def nlist(self) -> int:
        return self.centroids.shape[0]

    def nbytes(self) -> int:
        """Bytes held: codes, scales, ids, centroids, offsets, attribute store, Bloom index."""
        return (
            self.codes.nbytes()
            + 8 * len(self.ids)
            + 4 * self.centroids.numel()
            + 8 * len(self.list_offsets)
            + self.attributes.nbytes()
            + self.bloom.nbytes()
            + 8 * len(self.sample)
        )

    def vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 [*rows.shape, D]: the stored (dequantized) vectors of segment ``rows``."""
        return self.codes.codes[rows].float() * self.codes.scales[rows].unsqueeze(-1)

    def executor_tensors(self) -> dict[str, torch.Tensor]:
        """The static inputs of the tensor-only search
        (:func:`sterling.ops.reference.masked_ivf_topk.masked_ivf_topk`): its keyword arguments
        ``centroids`` float32 [nlist, D], ``row_list`` int64 [N] (the list of every row),
        ``codes`` int8 [N, D] and ``scales`` float32 [N], and ``ids`` int64 [N], the external id of
        every row (pop it before the call; it maps the returned rows to ids)."""
        row_list = torch.repeat_interleave(torch.arange(self.nlist), self.list_offsets.diff())
        return {
            "centroids": self.centroids,
            "row_list": row_list,
            "codes": self.codes.codes,
            "scales": self.codes.scales,
            "ids": self.ids,
        }

    @functools.cached_property
    def id_map(self) -> IdMap:
        """External id → segment row, built once."""
        return IdMap.build(self.ids)

    @functools.cached_property
    def _sample_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of the sampled words (int64) and, per sampled word, the bits of real rows."""
        rows = (self.sample[:, None] * 64 + torch.arange(64)).view(-1)
        inside = rows < len(self)
        return rows[inside], pack_rows(inside)

    @functools.cached_property
    def _scan_kernel(self) -> Kernel:
        """The IVF scan kernel: the configured one, else Triton where CUDA is available, else CPU."""
        if self.config.kernel is not None:
            return self.config.kernel
        return Kernel.TRITON if torch.cuda.is_available() else Kernel.CPU

    @property
    def _host_kernel(self) -> Kernel:
        """The kernel of the ops that run on the host whatever the scan's (the probe's top-k, the
        gather plan's ``int8_topk``): the scan's, with the CPU one for Triton."""
        return Kernel.CPU if self._scan_kernel is Kernel.TRITON else self._scan_kernel

    @functools.cached_property
    def _scan_arrays(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """codes, scales, list offsets and Bloom bits on the scan kernel's device (copied once to
        the GPU for the Triton kernel when CUDA is available)."""
        arrays = (self.codes.codes, self.codes.scales, self.list_offsets, self.bloom.bits)
        if self._scan_kernel is Kernel.TRITON and torch.cuda.is_available():
            return tuple(a.cuda() for a in arrays)
        return arrays

    @functools.cached_property
    def _scan_bounds(self) -> torch.Tensor | None:
        """The CPU scan's per-list int8 rounding bounds (:func:`sterling.ops.ivf_scan.list_bounds`),
        computed once; None for the other kernels."""
        if self._scan_kernel is not Kernel.CPU:
            return None
        return list_bounds(self.codes.codes, self.codes.scales, self.list_offsets)

    def compiled(self, expr: str) -> CompiledFilter:
        """``expr`` parsed, compiled to a Bloom plan and its selectivity estimated (cached)."""
        rows, inside = self._sample_rows
        return _remember(
            self._filters,
            expr,
            _PLAN_CACHE_SIZE,
            lambda: compile_filter(expr, self.bloom, self.attributes, rows, self.sample, inside),
        )

    def filter_words(self, expr: str | None) -> torch.Tensor:
        """int64 [ceil(N / 64)]: the rows passing ``expr`` exactly (None: every row), packed as
        :func:`pack_rows` does (Bloom candidates, checked exactly; cached, do not modify)."""

        def pack() -> torch.Tensor:
            mask = torch.zeros(len(self), dtype=torch.bool)
            mask[self._passing(None if expr is None else self.compiled(expr), None)] = True
            return pack_rows(mask)

        return _remember(self._words, expr, _WORDS_CACHE_SIZE, pack)

    def plan_probes(self, filters: list[str | None], k: int, nprobe: int | None = None) -> torch.Tensor:
        """int64 [B]: the lists :meth:`search` probes first for each query (before widening), one
        filter expression (or None) each: ``nlist`` for a scan or a gathered filter (both exact
        over every list), 0 where nothing can pass (a constant-false filter, an empty segment)."""
        plans = self._plan(filters, k, nprobe)
        return torch.tensor([self.nlist if plans[f].gather else plans[f].probes for f in filters], dtype=torch.int64)

    def _plan(self, filters: list[str | None], k: int, nprobe: int | None) -> dict[str | None, FilterPlan]:
        """The plan of every distinct filter of a batch (:func:`sterling.index.planner.plan_batch`;
        a small batch's cached by its filters, k and nprobe)."""
        return _remember(
            self._plans,
            _batch_key(filters, k, nprobe),
            _BATCH_CACHE_SIZE,
            lambda: plan_batch(filters, self.compiled, k, nprobe, len(self), self.nlist, self.config),
        )

    def search(
        self,
        queries: torch.Tensor,
        filters: list[str | None],
        k: int,
        nprobe: int | None = None,
        alive: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
        """Filtered top-k of ``queries`` (float32 [B, D]), one filter expression (or None) each.

        Args:
            queries (torch.Tensor): float32 [B, D].
            filters (list[str | None]): B expressions.
            k (int): results per query.
            nprobe (int | None): lists probed at least (default ``config.nprobe``).
            alive (torch.Tensor | None): int64 [ceil(N / 64)] live-row words (:func:`pack_rows`);
                rows whose bit is clear (deleted) never return.

        Returns:
            scores float32 [B, k] descending, segment rows int64 [B, k] (-inf / -1 past the
            passing rows), and one explain record per distinct filter.
        """
        b = queries.shape[0]
        scores = torch.full((b, k), float("-inf"))
        rows = torch.full((b, k), -1, dtype=torch.int64)
        plans = self._plan(filters, k, nprobe)
        compiled = {expr: plan.filter for expr, plan in plans.items()}
        kk = max(1, min(k, len(self)))  # no segment returns more than its rows: k beyond N only pads
        explain = []
        for expr, plan in plans.items():
            flt, probes, gather = plan.filter, plan.probes, plan.gather
            if gather:
                idx = torch.tensor([i for i, f in enumerate(filters) if f == expr])
                scores[idx, :kk], rows[idx, :kk] = self._gathered(queries[idx], flt, kk, alive)
            explain.append(
                {
                    "filter": expr,
                    "queries": plan.queries,
                    "estimated_selectivity": plan.share,
                    "plan": "gather"
                    if gather
                    else "none"
                    if probes == 0
                    else "scan"
                    if probes >= self.nlist
                    else "ivf",
                    "nprobe": probes,
                    "bloom_exact": True if flt is None else flt.plan.exact,
                    "widened_queries": 0,
                }
            )
        widened: dict[int, int] = {}
        current = {i: plans[f].probes for i, f in enumerate(filters) if plans[f].probes > 0}
        while current:
            short: list[int] = []
            for scan in (False, True):  # one kernel call for all IVF queries, one for all scans
                members = [i for i, p in current.items() if (p >= self.nlist) == scan]
                if not members:
                    continue
                counts = torch.tensor([current[i] for i in members])
                idx = slice(None) if len(members) == b else torch.tensor(members)  # whole batch: no copies
                s, r = self._search(queries[idx], [filters[i] for i in members], compiled, kk, counts, alive)
                scores[idx, :kk], rows[idx, :kk] = s, r
                if not scan:
                    short += [members[j] for j in np.flatnonzero((r.numpy() >= 0).sum(1) < kk)]
            for i in short:
                widened[i] = widened.get(i, 0) + 1
            current = {i: min(self.nlist, 4 * current[i]) for i in short}
        for record in explain:
            record["widened_queries"] = sum(1 for i in widened if filters[i] == record["filter"])
        return scores, rows, explain

    def _gathered(
        self, q: torch.Tensor, flt: CompiledFilter | None, k: int, alive: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-filtering for queries sharing one selective filter: its passing live rows (Bloom
        candidates, checked exactly) scored by one int8 matrix product (:mod:`sterling.ops.int8_topk`)."""
        passing = self._passing(flt, alive)
        if not len(passing):
            return torch.full((q.shape[0], k), float("-inf")), torch.full((q.shape[0], k), -1, dtype=torch.int64)
        return int8_topk(q, self.codes.codes, self.codes.row_scales(), passing, k, kernel=self._host_kernel)

    def _passing(self, flt: CompiledFilter | None, alive: torch.Tensor | None) -> torch.Tensor:
        """int64 [M], ascending: the live rows (all if ``alive`` is None) passing ``flt`` exactly:
        its Bloom candidates, checked against the attribute store unless the plan is exact."""
        passing = torch.arange(len(self)) if flt is None else self.bloom.candidates(flt.plan)
        if alive is not None:
            passing = passing[bit_of(alive, passing)]
        if flt is not None and not flt.plan.exact:
            passing = passing[self.attributes.evaluate_rows(flt.node, passing)]
        return passing

    def _search(
        self,
        q: torch.Tensor,
        filters: list[str | None],
        compiled: dict[str | None, CompiledFilter | None],
        k: int,
        probes: torch.Tensor,
        alive: torch.Tensor | None,
        k0: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One fused scan of each query's ``probes`` (int64 [B]) nearest lists (nlist: all) for
        ``k0`` candidates, the exact check, top-k. Queries whose Bloom false positives left fewer
        than k verified candidates (while more rows may pass) are scanned again for 4× the
        candidates."""
        b = q.shape[0]
        scan = _remember(
            self._programs, _batch_key(filters), _BATCH_CACHE_SIZE, lambda: _scan_program(filters, compiled)
        )
        widest = int(probes.max())
        if widest >= self.nlist:
            probe_ids = torch.arange(self.nlist).expand(b, -1).clone()
            probe_ids[torch.arange(self.nlist) >= probes[:, None]] = -1  # each query its own count
        else:
            # each query its own count of nearest lists, the nearest first (the scan's first round)
            probe_ids = nearest_lists(q, self.centroids, widest, probes, kernel=self._host_kernel)
        k0 = min(k0 or math.ceil(k * scan.factor), max(len(self), k))  # never above N
        codes, scales, offsets, bits = self._scan_arrays
        dev = codes.device
        scores, cand = ivf_scan(
            q.to(dev),
            codes,
            scales,
            offsets,
            probe_ids.to(dev),
            k0,
            bits,
            scan.program,
            scan.plan_of.to(dev),
            None if alive is None else alive.to(dev),
            kernel=self._scan_kernel,
            bounds=self._scan_bounds,
        )  # [B, k0]
        scores, cand = scores.cpu(), cand.cpu()  # [B, k0], k0 >= k
        found = cand.numpy()  # numpy: a few small index ops per distinct filter, tens of them a batch
        checked = found >= 0
        groups: dict[str | None, list[int]] = {}
        for i, expr in enumerate(filters):
            groups.setdefault(expr, []).append(i)
        for expr, group in groups.items():
            if expr is not None and not compiled[expr].plan.exact:
                ok = checked[group]
                rows = torch.from_numpy(found[group][ok])
                ok[ok] = self.attributes.evaluate_rows(compiled[expr].node, rows, expr).numpy()
                checked[group] = ok
        # k0 candidates came back (more rows may pass) but fewer than k were verified
        starved = np.flatnonzero((found[:, -1] >= 0) & (checked.sum(1) < k))
        if k0 > k or not checked.all():  # each query's first k verified candidates: its k best
            rank = np.cumsum(checked, axis=1) - 1  # [B, k0], the scan's candidates come in score order
            at, j = np.nonzero(checked & (rank < k))
            best_s, best_r = np.full((b, k), -np.inf, dtype=np.float32), np.full((b, k), -1, dtype=np.int64)
            best_s[at, rank[at, j]], best_r[at, rank[at, j]] = scores.numpy()[at, j], found[at, j]
            scores, cand = torch.from_numpy(best_s), torch.from_numpy(best_r)
        if len(starved) and k0 < len(self):
            again = torch.from_numpy(starved)
            scores[again], cand[again] = self._search(
                q[again], [filters[i] for i in starved], compiled, k, probes[again], alive, 4 * k0
            )
        return scores, cand
