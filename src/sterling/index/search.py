"""SilverTorch search over one cluster-sorted segment: plan → probe → partial Bloom → int8 scan →
verify → top-k (spec ``silvertorch.md`` §4, Algorithm 1), with a fallback the paper lacks.

A :class:`Segment` holds N items *in IVF order* (items of a cluster are contiguous rows): int8 codes
with one scale per item, centroids and list offsets, the exact attribute store and the Bloom index
in the same row order, and a fixed random sample of the attribute rows for selectivity estimates.
It keeps no float copy of the embeddings: the scores are inner products with the dequantized
vectors ``codes * scale``, and "exact" below means exact with respect to those stored vectors.

Per batch, queries are grouped by filter expression and each group gets a plan:

* **scan** (filter-then-scan): the filter's exact mask from the forward index, the passing rows
  gathered and scored exactly. Chosen when the estimated share of passing items is at most
  ``scan_selectivity`` (then a probe would find too few of them, and there are few to score), when
  ``nprobe >= nlist`` (a full probe *is* a scan), or when the segment has a single list.
* **ivf**: probe the ``nprobe`` nearest centroids, evaluate the Bloom plan only over the probed
  clusters' rows (a partial mask ``[B, P, L]``), int8 scan of the surviving rows for the top
  ``rescore_factor * k`` candidates, rescored with float queries. Unless the Bloom plan is exact,
  the candidates are then checked against the exact attribute store (Bloom false positives are
  dropped; NOT never drops a passing row, see :mod:`sterling.index.bloom`).

**Selective filters never starve the result.** A query whose verified candidates number fewer than
k is searched again with 4× the probes, and at ``nprobe >= nlist`` by an exact scan, which returns
every passing row up to k. So no query returns fewer than ``min(k, #passing)`` results.

``explain`` lists, per filter group, the estimate, the plan, the probes and any widening.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from sterling.index.attributes import AttributeStore
from sterling.index.bloom import BloomConfig, BloomIndex, BloomPlan
from sterling.index.filter import FilterNode, parse
from sterling.index.ivf import IVFLayout
from sterling.index.quant import Int8Codes, quantize, quantize_queries
from sterling.ops.filtered_topk import filtered_topk
from sterling.ops.int8_scan import Kernel, int8_scan

__all__ = ["Segment", "SegmentConfig", "auto_nlist"]


def auto_nlist(n: int) -> int:
    """Lists for ``n`` items: the power of two nearest √n (1,000,000 → 1,024), 1 below 4,096 items."""
    return 1 if n < 4096 else 2 ** round(math.log2(math.sqrt(n)))


@dataclass(frozen=True)
class SegmentConfig:
    """How a segment is built and searched.

    Args:
        nlist (int | None): IVF lists; None picks :func:`auto_nlist`.
        nprobe (int): lists probed per query by default.
        scan_selectivity (float): filters estimated to pass at most this share of items are
            answered by an exact scan of the passing rows.
        rescore_factor (int): the int8 scan keeps ``rescore_factor * k`` candidates for float
            rescoring and the exact check.
        sample_size (int): attribute rows sampled for selectivity estimates.
        kmeans_iters (int): Lloyd iterations. seed (int): k-means and sampling seed.
        bloom (BloomConfig): Bloom index sizing.
        kernel (Kernel): the int8 scan implementation.
    """

    nlist: int | None = None
    nprobe: int = 32
    scan_selectivity: float = 0.02
    rescore_factor: int = 2
    sample_size: int = 16384
    kmeans_iters: int = 10
    seed: int = 0
    bloom: BloomConfig = field(default_factory=BloomConfig)
    kernel: Kernel = Kernel.CPU

    def __post_init__(self) -> None:
        for name in ("nprobe", "rescore_factor", "sample_size", "kmeans_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.nlist is not None and (isinstance(self.nlist, bool) or not isinstance(self.nlist, int) or self.nlist < 1):
            raise ValueError(f"nlist must be None or an int >= 1, got {self.nlist!r}")
        if not 0.0 <= self.scan_selectivity <= 1.0:
            raise ValueError(f"scan_selectivity must be in [0, 1], got {self.scan_selectivity!r}")


@dataclass(frozen=True)
class Segment:
    """N items in IVF order, searchable with filters.

    Attributes:
        codes (Int8Codes): int8 [N, D] codes and float32 [N] scales, in IVF order.
        centroids (torch.Tensor): float32 [nlist, D].
        list_offsets (torch.Tensor): int64 [nlist + 1]; cluster c is rows ``offsets[c]:offsets[c+1]``.
        order (torch.Tensor): int64 [N]: segment row r holds input item ``order[r]``.
        attributes (AttributeStore): exact attributes, in IVF order.
        bloom (BloomIndex): the Bloom index, in IVF order.
        sample (AttributeStore): ``sample_size`` random rows of ``attributes``.
        config (SegmentConfig): how it was built.
    """

    codes: Int8Codes
    centroids: torch.Tensor
    list_offsets: torch.Tensor
    order: torch.Tensor
    attributes: AttributeStore
    bloom: BloomIndex
    sample: AttributeStore
    config: SegmentConfig

    @classmethod
    def build(cls, embeddings: torch.Tensor, attributes: AttributeStore, config: SegmentConfig = SegmentConfig()) -> "Segment":
        """Cluster ``embeddings`` (float [N, D]), sort everything by cluster, quantize, index."""
        n = embeddings.shape[0]
        if len(attributes) != n:
            raise ValueError(f"{n} embeddings but {len(attributes)} attribute rows")
        nlist = min(config.nlist or auto_nlist(n), max(n, 1))
        if nlist > 1:
            layout = IVFLayout.build(embeddings, nlist, iters=config.kmeans_iters, seed=config.seed)
        else:
            centre = embeddings.mean(0, keepdim=True) if n else torch.zeros(1, embeddings.shape[1])
            layout = IVFLayout(centre.float(), torch.arange(n), torch.tensor([0, n]))
        order = layout.order
        sorted_attributes = attributes.take(order)
        gen = torch.Generator().manual_seed(config.seed)
        sample_rows = torch.randperm(n, generator=gen)[: config.sample_size].sort().values
        return cls(
            codes=quantize(embeddings[order].float(), per_item=True),
            centroids=layout.centroids,
            list_offsets=layout.list_offsets,
            order=order,
            attributes=sorted_attributes,
            bloom=BloomIndex.build(sorted_attributes, config=config.bloom),
            sample=sorted_attributes.take(sample_rows),
            config=config,
        )

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def nlist(self) -> int:
        return self.centroids.shape[0]

    def vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 [M, D]: the stored (dequantized) vectors of segment ``rows``."""
        return self.codes.codes[rows].float() * self.codes.scales[rows, None]

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
            nprobe (int | None): lists probed (default ``config.nprobe``).
            alive (torch.Tensor | None): bool [N]; rows that are False (deleted) never return.

        Returns:
            scores float32 [B, k] descending, segment rows int64 [B, k] (-inf / -1 past the
            passing rows), and the explain records.
        """
        nprobe = nprobe or self.config.nprobe
        b = queries.shape[0]
        scores = torch.full((b, k), float("-inf"))
        rows = torch.full((b, k), -1, dtype=torch.int64)
        explain: list[dict[str, Any]] = []
        groups: dict[str | None, list[int]] = {}
        for i, expr in enumerate(filters):
            groups.setdefault(expr, []).append(i)
        ivf_queries: list[int] = []
        for expr, members in groups.items():
            node = None if expr is None else parse(expr)
            share = 1.0 if node is None else float(self.sample.evaluate(node, expr).float().mean()) if len(self.sample) else 0.0
            scan = nprobe >= self.nlist or share <= self.config.scan_selectivity
            explain.append({"filter": expr, "queries": len(members), "estimated_selectivity": share,
                            "plan": "scan" if scan else "ivf", "nprobe": None if scan else nprobe})
            if scan:
                idx = torch.tensor(members)
                scores[idx], rows[idx] = self._scan(queries[idx], node, expr, k, alive)
            else:
                ivf_queries += members
        if ivf_queries:
            idx = torch.tensor(ivf_queries)
            s, r, widened = self._ivf(queries[idx], [filters[i] for i in ivf_queries], k, nprobe, alive)
            scores[idx], rows[idx] = s, r
            for record in explain:
                if record["plan"] == "ivf":
                    record["widened_queries"] = sum(
                        1 for j, i in enumerate(ivf_queries) if filters[i] == record["filter"] and widened.get(j)
                    )
        return scores, rows, explain

    def _scan(self, q: torch.Tensor, node: FilterNode | None, expr: str | None, k: int, alive: torch.Tensor | None):
        mask = None if node is None else self.attributes.evaluate(node, expr)
        if alive is not None:
            mask = alive if mask is None else mask & alive
        passing = torch.arange(len(self)) if mask is None else torch.nonzero(mask).view(-1)
        if len(passing) == 0:
            return torch.full((q.shape[0], k), float("-inf")), torch.full((q.shape[0], k), -1, dtype=torch.int64)
        s, local = filtered_topk(q, self.vectors(passing), None, k)
        return s, torch.where(local >= 0, passing[local.clamp(min=0)], -1)

    def _ivf(self, q: torch.Tensor, filters: list[str | None], k: int, nprobe: int, alive: torch.Tensor | None):
        """Algorithm 1 for queries [B, D]; returns scores, rows and {query: times widened}."""
        b = q.shape[0]
        plans = {expr: (None if expr is None else self.bloom.compile(parse(expr), expr)) for expr in set(filters)}
        probes = self._probe(q, nprobe)                                              # [B, P]
        starts = self.list_offsets[probes]                                           # [B, P]
        lengths = self.list_offsets[probes + 1] - starts                             # [B, P]
        width = int(lengths.max()) if lengths.numel() else 0
        slot = torch.arange(width)                                                   # [L]
        inside = slot < lengths[..., None]                                           # [B, P, L]
        slot_rows = (starts[..., None] + slot).clamp(max=max(len(self) - 1, 0))      # [B, P, L]
        mask = inside.clone()
        for i, expr in enumerate(filters):
            plan = plans[expr]
            if plan is not None:
                ranges = torch.stack([starts[i], starts[i] + lengths[i]], dim=1)
                mask[i][inside[i]] = self.bloom.mask(plan, ranges)
        if alive is not None:
            mask &= alive[slot_rows]
        k0 = self.config.rescore_factor * k
        qc = quantize_queries(q)
        _, cand = int8_scan(qc.codes, qc.scales, self.codes.codes, self.codes.scales, self.list_offsets,
                            probes, k0, mask, kernel=self.config.kernel)               # [B, k0]
        valid = cand >= 0
        exact = torch.tensor([plans[f] is None or plans[f].exact for f in filters])
        valid &= self._verify(cand, valid, filters, exact)
        cand_scores = torch.einsum("bkd,bd->bk", self.vectors(cand.clamp(min=0)), q)
        cand_scores = cand_scores.masked_fill(~valid, float("-inf"))
        top = torch.topk(cand_scores, min(k, k0), dim=1)
        scores = torch.full((b, k), float("-inf"))
        rows = torch.full((b, k), -1, dtype=torch.int64)
        scores[:, : top.values.shape[1]] = top.values
        rows[:, : top.values.shape[1]] = torch.where(torch.isfinite(top.values), cand.gather(1, top.indices), -1)
        short = torch.nonzero((rows >= 0).sum(1) < k).view(-1).tolist()
        widened: dict[int, int] = {}
        if short:
            idx = torch.tensor(short)
            wider = [filters[i] for i in short]
            if nprobe * 4 >= self.nlist:
                for i, expr in zip(short, wider):
                    s, r = self._scan(q[i : i + 1], None if expr is None else parse(expr), expr, k, alive)
                    scores[i], rows[i] = s[0], r[0]
                    widened[i] = 1
            else:
                s, r, again = self._ivf(q[idx], wider, k, nprobe * 4, alive)
                scores[idx], rows[idx] = s, r
                widened.update({i: 1 + again.get(j, 0) for j, i in enumerate(short)})
        return scores, rows, widened

    def _probe(self, q: torch.Tensor, nprobe: int) -> torch.Tensor:
        """int64 [B, P]: the ``nprobe`` centroids of highest inner product with each query."""
        return torch.topk(q @ self.centroids.T, min(nprobe, self.nlist), dim=1).indices

    def _verify(self, cand: torch.Tensor, valid: torch.Tensor, filters: list[str | None], exact: torch.Tensor) -> torch.Tensor:
        """bool [B, k0]: candidates that pass their query's filter exactly (Bloom-exact plans and
        unfiltered queries pass as they are)."""
        ok = torch.ones_like(valid)
        for i in torch.nonzero(~exact).view(-1).tolist():
            rows = cand[i][valid[i]]
            if len(rows):
                passed = self.attributes.take(rows).evaluate(parse(filters[i]), filters[i])
                ok[i][valid[i]] = passed
        return ok
