"""The planner of a segment search: how the queries sharing one filter are answered.

Each distinct filter of a batch is parsed, compiled into a Bloom plan and given an estimated
selectivity ``s`` (the share of a fixed random sample of rows that passes, exactly; the same sample
gives the Bloom pass's share, so the false-positive ratio) once: :func:`compile_filter`, cached by
the segment. Its queries probe ``nprobe * s^(-1/3)`` lists: the filtered top-k of an independent
filter is the unfiltered top-k/s thinned out, which spreads over more lists as s falls (measured on
the ``bench ann`` data: a 10% filter needs about 2x the probes of a 50% one for the same recall, a 1%
filter about 4x), and at least enough lists to expect ``min_candidates * k`` passing rows. When that
is half the lists or more, or ``s <= scan_selectivity``, the plan is a **scan** of all lists, which
the Bloom words make a filter-then-scan (a filtered row costs one bit test). A filter shared by
``gather_queries`` or more queries and expected to pass at most ``gather_rows`` rows is answered
instead by **gathering** its passing rows once and one int8 matrix product (FAISS's pre-filtering,
exact; :func:`sterling.ops.int8_topk.int8_topk`) when that is cheaper for its ``q`` queries: a
gathered row costs a query about ``gather_cost`` probed rows and the gather itself ``gather_fixed``
probed rows per segment row, so when ``(gather_cost * s + gather_fixed / q) * nlist <= probes``. A
filter whose Bloom plan is constant false is planned as no scan at all (:func:`plan_batch`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sterling.index.attributes import AttributeStore
from sterling.index.bloom import BloomIndex
from sterling.index.bloom_plan import BloomPlan
from sterling.index.config import IndexConfig
from sterling.index.filter import FilterNode, parse
from sterling.ops.ivf_scan import encode
from sterling.ops.plan_program import plan_words

__all__ = ["CompiledFilter", "FilterPlan", "compile_filter", "plan_batch", "probes_for"]


@dataclass(frozen=True)
class CompiledFilter:
    """One filter expression, compiled for a segment."""

    node: FilterNode
    plan: BloomPlan
    share: float  # estimated share of rows passing
    bloom_share: float  # estimated share of rows the Bloom plan lets through (>= share)

    def candidates_factor(self) -> float:
        """How many Bloom candidates to keep per verified result: 1 for an exact plan, else 1.5x
        the estimated Bloom-to-exact ratio (false positives are dropped after the scan; the margin
        absorbs the spread of the estimate, a starved query is scanned again)."""
        return 1.0 if self.plan.exact else 1.5 * max(1.0, self.bloom_share / max(self.share, 1e-9))


@dataclass(frozen=True)
class FilterPlan:
    """How the queries sharing one filter are answered."""

    filter: CompiledFilter | None  # None: no filter
    share: float  # estimated share of rows passing
    queries: int  # queries of the batch with this filter
    probes: int  # lists the scan probes first (nlist: all); 0: no scan (nothing passes, or gathered)
    gather: bool  # answered by gathering the passing rows (exact, as a scan of all lists)


def compile_filter(
    expr: str,
    bloom: BloomIndex,
    attributes: AttributeStore,
    sample_rows: torch.Tensor,
    sample_words: torch.Tensor,
    inside: torch.Tensor,
) -> CompiledFilter:
    """``expr`` parsed, compiled to a Bloom plan, and its exact and Bloom selectivities estimated on
    the sampled rows (int64 [S]) of the sampled Bloom word columns (int64 [S / 64]; ``inside`` int64
    [S / 64] marks the bits of real rows). An empty sample estimates 0."""
    node = parse(expr)
    plan = bloom.compile(node, expr)
    share = bloom_share = 0.0
    if len(sample_rows):
        share = float(attributes.evaluate_rows(node, sample_rows, expr).float().mean())
        if not plan.exact:
            words = plan_words(bloom.bits, encode([plan]), 0, sample_words) & inside
            bloom_share = int(np.unpackbits(words.numpy().view(np.uint8)).sum()) / len(sample_rows)
        bloom_share = max(bloom_share, share)
    return CompiledFilter(node, plan, share, bloom_share)


def probes_for(share: float, nprobe: int, k: int, n: int, nlist: int, config: IndexConfig) -> int:
    """Lists to probe for a filter passing ``share`` of a segment's ``n`` rows in ``nlist`` lists
    (``nlist``: a scan)."""
    if share <= config.scan_selectivity:
        return nlist
    per_list = share * n / nlist
    needed = math.ceil(config.min_candidates * k / per_list)
    probes = max(math.ceil(nprobe * share ** (-1 / 3)), needed)
    return nlist if 2 * probes >= nlist else probes


def plan_batch(
    filters: list[str | None],
    compiled: Callable[[str], CompiledFilter],
    k: int,
    nprobe: int | None,
    n: int,
    nlist: int,
    config: IndexConfig,
) -> dict[str | None, FilterPlan]:
    """The plan of every distinct filter of a batch of queries (one expression or None each) over a
    segment of ``n`` rows in ``nlist`` lists; ``compiled`` gives an expression's compiled filter."""
    nprobe = min(nprobe or config.nprobe, nlist)
    plans = {}
    for expr in dict.fromkeys(filters):
        flt = None if expr is None else compiled(expr)
        share = 1.0 if flt is None else flt.share
        constant = None if flt is None else flt.plan.constant
        probes = 0 if n == 0 or constant is False else probes_for(share, nprobe, k, n, nlist, config)
        count = filters.count(expr)
        gather = (
            count >= config.gather_queries
            and share * n <= config.gather_rows
            and probes > 0
            and (config.gather_cost * share + config.gather_fixed / count) * nlist <= probes
        )
        plans[expr] = FilterPlan(flt, share, count, 0 if gather else probes, gather)
    return plans
