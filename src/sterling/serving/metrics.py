"""The server's Prometheus metrics, in a registry of their own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ServingMetrics", "STAGES"]

#: The stages of a forward (:class:`sterling.retrieval.model.Trace`), plus the wait in the batcher
#: (``ranker``: the request-level ranker's scoring, in place of ``overarch``).
STAGES = ("queue", "user_tower", "ann", "overarch", "ranker", "value_model")

_LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_CANDIDATES = (0, 1, 10, 50, 100, 200, 500, 1000, 2000, 5000)


class ServingMetrics:
    """Counters, histograms and gauges of one server."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "sterling_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "sterling_request_latency_seconds",
            "Request latency by endpoint",
            ["endpoint"],
            buckets=_LATENCY,
            registry=r,
        )
        self.stage = Histogram(
            "sterling_stage_latency_seconds", "Per-batch time of each stage", ["stage"], buckets=_LATENCY, registry=r
        )
        self.batch_size = Histogram("sterling_batch_size", "Requests per forward", buckets=_SIZES, registry=r)
        self.candidates = Histogram(
            "sterling_candidates_after_filter",
            "Distinct candidates per request after the filter and the merge",
            buckets=_CANDIDATES,
            registry=r,
        )
        self.index_items = Gauge("sterling_index_items", "Items the index serves (live)", registry=r)
        self.fresh_items = Gauge("sterling_fresh_items", "Items upserted since the snapshot", registry=r)
        self.snapshot = Gauge(
            "sterling_snapshot_info", "The snapshot served (value 1)", ["version", "path"], registry=r
        )
        self.updates = Counter("sterling_item_updates", "Items upserted or deleted", ["op"], registry=r)
        self.reloads = Counter("sterling_reloads", "Snapshot reloads by result", ["result"], registry=r)

    def served(self, version: str, path: str, items: int, fresh: int) -> None:
        """The snapshot now served and the index's size."""
        self.snapshot.clear()
        self.snapshot.labels(version=version, path=path).set(1)
        self.index_items.set(items)
        self.fresh_items.set(fresh)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
