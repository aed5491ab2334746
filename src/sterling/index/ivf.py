"""Inverted-file (IVF) layout: seeded k-means++ on torch and the cluster-sorted item order.

SilverTorch §3.1: items are sorted by cluster and stored contiguously, with CSR offsets marking the
cluster boundaries, so a probed cluster is one contiguous run of rows (of int8 codes, and of Bloom
columns in the same order, §4.1). Clustering uses squared L2 distance (k-means); probing ranks
centroids by inner product with the query, as the index ranks items by inner product (FAISS's
IVF with METRIC_INNER_PRODUCT does the same).

Training runs on a seeded subsample of at most ``sample`` points (default 256 per list, FAISS's
``max_points_per_centroid``); k-means++ seeding runs on a smaller subsample (at most 32 points per
list) because it is sequential in ``nlist``. Distances are matmuls, chunked so a [chunk, nlist]
block stays small. Measured on 2 cores (AVX-512), N = 1,000,000, D = 64, nlist = 1024, 10
iterations, idle machine: 7.8 s (k-means++ 1.0 s, Lloyd 10 × 0.5 s, assigning all N 1.5 s).
Probe recall matches FAISS's IVF1024 trained on the same sample size (0.647 vs 0.651 of the exact
top-100 inside the 64 probed lists).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sterling.ops.nearest_lists import nearest_lists

_CHUNK_ELEMS = 1 << 22  # distance-block elements: [chunk, nlist] float32 = 16 MiB


def _desc(t: torch.Tensor) -> str:
    return f"{t.dtype} {list(t.shape)}"


def _check_matrix(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        got = f"{_desc(x)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a float tensor [N, D], got {got}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return x.float().contiguous()


def _check_int(value: int, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row by squared L2 distance.

    Args:
        x (torch.Tensor): float32 [N, D].
        centroids (torch.Tensor): float32 [C, D], C >= 1.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: the centroid int64 [N] and the squared distance
        float32 [N] (clamped at 0). Ties go to the lower centroid index.
    """
    n, c = x.shape[0], centroids.shape[0]
    half_norms = 0.5 * (centroids * centroids).sum(1)  # [C]
    labels = torch.empty(n, dtype=torch.int64)
    dists = torch.empty(n, dtype=torch.float32)
    chunk = max(1, _CHUNK_ELEMS // max(c, 1))
    for start in range(0, n, chunk):
        block = x[start : start + chunk]
        # ||x - c||^2 = ||x||^2 - 2 (x·c - ||c||^2 / 2): minimise the bracket's negation
        score = torch.addmm(half_norms, block, centroids.T, beta=-1.0)  # [chunk, C] x·c - |c|²/2
        best, arg = score.max(dim=1)
        labels[start : start + chunk] = arg
        dists[start : start + chunk] = ((block * block).sum(1) - 2 * best).clamp_(min=0)
    return labels, dists


def _kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (D² sampling) of ``k`` centroids from the rows of ``x`` [n >= k, D]."""
    n = x.shape[0]
    sq = (x * x).sum(1)  # [n]
    first = int(torch.randint(n, (1,), generator=gen))
    centroids = torch.empty(k, x.shape[1], dtype=torch.float32)
    centroids[0] = x[first]
    min_d = (sq - 2 * (x @ x[first]) + sq[first]).clamp_(min=0)
    for i in range(1, k):
        total = float(min_d.sum())
        if total > 0:
            pick = int(torch.multinomial(min_d, 1, generator=gen))
        else:  # every point coincides with a centroid: any point will do
            pick = int(torch.randint(n, (1,), generator=gen))
        centroids[i] = x[pick]
        torch.minimum(min_d, (sq - 2 * (x @ x[pick]) + sq[pick]).clamp_(min=0), out=min_d)
    return centroids


def kmeans(
    x: torch.Tensor,
    nlist: int,
    iters: int = 10,
    seed: int = 0,
    sample: int | None = None,
) -> torch.Tensor:
    """Seeded k-means (k-means++ init, Lloyd iterations) by squared L2 distance.

    Deterministic for a seed (on a fixed machine and thread count). Training runs on a random
    subsample of ``sample`` rows when N is larger; an empty cluster is re-seeded with the training
    point farthest from its centroid (distinct points for distinct empty clusters). Stops early
    once no assignment changes.

    Args:
        x (torch.Tensor): float [N, D], finite, N >= nlist.
        nlist (int): number of centroids, >= 1.
        iters (int): Lloyd iterations after seeding, >= 0.
        seed (int): seed of the subsample and the k-means++ draws.
        sample (int | None): most training points; default 256 · nlist.

    Returns:
        torch.Tensor: centroids float32 [nlist, D].

    Raises:
        ValueError: bad shapes or arguments, NaN/inf, or fewer than ``nlist`` points.
    """
    x = _check_matrix(x, "x")
    _check_int(nlist, "nlist", 1)
    _check_int(iters, "iters", 0)
    if sample is not None:
        _check_int(sample, "sample", nlist)
    n = x.shape[0]
    if n < nlist:
        raise ValueError(f"need at least nlist={nlist} points, got {n}")
    gen = torch.Generator().manual_seed(int(seed))
    sample = 256 * nlist if sample is None else sample
    train = x[torch.randperm(n, generator=gen)[:sample]] if n > sample else x
    seed_rows = min(len(train), 32 * nlist)
    centroids = _kmeanspp(train[:seed_rows], nlist, gen)  # train is already a random order
    labels = None
    for _ in range(iters):
        new_labels, dists = nearest(train, centroids)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        counts = torch.bincount(labels, minlength=nlist)
        sums = torch.zeros_like(centroids).index_add_(0, labels, train)
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None].float()
        empty = (~nonempty).nonzero().squeeze(1)
        if len(empty):
            far = dists.topk(len(empty)).indices
            centroids[empty] = train[far]
    return centroids


@dataclass(frozen=True)
class IVFLayout:
    """Centroids and the cluster-sorted order of N items.

    Sorted row r holds item ``order[r]``; the items of cluster c occupy sorted rows
    ``list_offsets[c]:list_offsets[c + 1]`` (in increasing item order within a cluster).

    Args:
        centroids (torch.Tensor): float32 [nlist, D].
        order (torch.Tensor): int64 [N], a permutation of ``range(N)``.
        list_offsets (torch.Tensor): int64 [nlist + 1], nondecreasing, from 0 to N.

    Example::

        layout = IVFLayout.build(torch.randn(1000, 8), nlist=16, seed=0)
        sorted_x = x[layout.order]              # cluster-sorted rows
        probes = layout.probe(torch.randn(4, 8), nprobe=3)  # int64 [4, 3]
    """

    centroids: torch.Tensor
    order: torch.Tensor
    list_offsets: torch.Tensor

    def __post_init__(self) -> None:
        c = self.centroids
        if c.dim() != 2 or c.dtype != torch.float32 or c.shape[0] < 1:
            raise ValueError(f"centroids must be float32 [nlist >= 1, D], got {_desc(c)}")
        if self.order.dtype != torch.int64 or self.order.dim() != 1:
            raise ValueError(f"order must be int64 [N], got {_desc(self.order)}")
        off = self.list_offsets
        if off.dtype != torch.int64 or off.shape != (c.shape[0] + 1,):
            raise ValueError(
                f"list_offsets must be int64 [nlist + 1 = {c.shape[0] + 1}], got {off.dtype} {list(off.shape)}"
            )
        if int(off[0]) != 0 or int(off[-1]) != len(self.order) or bool((off.diff() < 0).any()):
            raise ValueError("list_offsets must rise from 0 to N")

    @classmethod
    def build(
        cls,
        x: torch.Tensor,
        nlist: int,
        iters: int = 10,
        seed: int = 0,
        sample: int | None = None,
    ) -> IVFLayout:
        """Trains centroids with :func:`kmeans` and sorts the rows of ``x`` by cluster.

        Measured: N = 1,000,000, D = 64, nlist = 1024, iters = 10, 2 threads: 7.8 s on an idle
        machine (k-means on 262,144 sampled points, then assigning all N).

        Args:
            x (torch.Tensor): float [N, D], finite, N >= nlist.
            nlist, iters, seed, sample: see :func:`kmeans`.
        """
        x = _check_matrix(x, "x")
        centroids = kmeans(x, nlist, iters=iters, seed=seed, sample=sample)
        return cls.from_centroids(centroids, x)

    @classmethod
    def from_centroids(cls, centroids: torch.Tensor, x: torch.Tensor) -> IVFLayout:
        """The layout of ``x`` [N, D] under given ``centroids`` [nlist, D] (nearest by L2)."""
        centroids = _check_matrix(centroids, "centroids")
        x = _check_matrix(x, "x")
        if x.shape[1] != centroids.shape[1]:
            raise ValueError(f"x has D={x.shape[1]}, centroids D={centroids.shape[1]}")
        labels, _ = nearest(x, centroids)
        order = torch.sort(labels, stable=True).indices
        counts = torch.bincount(labels, minlength=centroids.shape[0])
        offsets = torch.zeros(centroids.shape[0] + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=offsets[1:])
        return cls(centroids, order, offsets)

    @property
    def nlist(self) -> int:
        return self.centroids.shape[0]

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    def __len__(self) -> int:
        return len(self.order)

    @property
    def list_sizes(self) -> torch.Tensor:
        """int64 [nlist]: items per cluster."""
        return self.list_offsets.diff()

    def labels(self) -> torch.Tensor:
        """int64 [N]: the cluster of every sorted row."""
        return torch.repeat_interleave(torch.arange(self.nlist), self.list_sizes)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """int64 [M]: the nearest centroid (squared L2) of every row of ``x`` float [M, D]."""
        x = _check_matrix(x, "x")
        if x.shape[1] != self.dim:
            raise ValueError(f"x has D={x.shape[1]}, the layout D={self.dim}")
        return nearest(x, self.centroids)[0]

    def probe(self, queries: torch.Tensor, nprobe: int) -> torch.Tensor:
        """The ``nprobe`` clusters whose centroids have the largest inner product with each query
        (:func:`sterling.ops.nearest_lists.nearest_lists`).

        Args:
            queries (torch.Tensor): float [B, D].
            nprobe (int): 1 <= nprobe <= nlist.

        Returns:
            torch.Tensor: int64 [B, nprobe], best first.
        """
        _check_int(nprobe, "nprobe", 1)
        if nprobe > self.nlist:
            raise ValueError(f"nprobe must be <= nlist={self.nlist}, got {nprobe}")
        q = _check_matrix(queries, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have D={q.shape[1]}, the layout D={self.dim}")
        return nearest_lists(q, self.centroids, nprobe)
