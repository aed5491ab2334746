"""k-means and the cluster-sorted IVF layout: determinism, convergence, invariants, probing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.index.ivf import IVFLayout, kmeans, nearest


def blobs(n: int, d: int, centres: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, d, generator=gen) * 4
    return c[torch.randint(centres, (n,), generator=gen)] + torch.randn(n, d, generator=gen)


def test_kmeans_is_deterministic_for_a_seed() -> None:
    x = blobs(2000, 8, 12, 0)
    a = kmeans(x, 10, iters=5, seed=3, sample=500)
    b = kmeans(x, 10, iters=5, seed=3, sample=500)
    assert torch.equal(a, b)
    assert not torch.equal(a, kmeans(x, 10, iters=5, seed=4, sample=500))


def test_converged_points_sit_at_their_nearest_centroid() -> None:
    x = blobs(1500, 6, 8, 1)
    centroids = kmeans(x, 8, iters=200, seed=0)  # all points train (1500 <= 256 * 8)
    labels, _ = nearest(x, centroids)
    # Lloyd fixpoint: each centroid is the mean of its points, each point at its nearest centroid
    for c in range(8):
        members = x[labels == c]
        assert len(members) > 0
        torch.testing.assert_close(centroids[c], members.mean(0), rtol=1e-4, atol=1e-4)
    d2 = torch.cdist(x.double(), centroids.double()) ** 2
    assert (d2.gather(1, labels[:, None]).squeeze(1) <= d2.min(1).values + 1e-6).all()


def test_empty_clusters_are_reseeded() -> None:
    x = torch.tensor([[0.0, 0.0]] * 40 + [[5.0, 5.0]] * 40 + [[9.0, 0.0]] * 3 + [[0.0, 9.0]])
    centroids = kmeans(x, 4, iters=20, seed=0)
    labels, _ = nearest(x, centroids)
    assert torch.isfinite(centroids).all() and len(labels.unique()) == 4


@st.composite
def catalogues(draw: st.DrawFn) -> tuple[torch.Tensor, int, int]:
    nlist = draw(st.integers(1, 12))
    n = draw(st.integers(nlist, 300))
    d = draw(st.integers(1, 8))
    x = blobs(n, d, draw(st.integers(1, 6)), draw(st.integers(0, 2**31)))
    if draw(st.booleans()):  # duplicated points
        x = x[torch.arange(n) % max(1, n // 3)]
    return x, nlist, draw(st.integers(0, 4))


@settings(max_examples=60, deadline=None)
@given(catalogues())
def test_layout_invariants(problem: tuple[torch.Tensor, int, int]) -> None:
    x, nlist, seed = problem
    layout = IVFLayout.build(x, nlist, iters=3, seed=seed)
    n = x.shape[0]
    assert layout.centroids.shape == (nlist, x.shape[1]) and layout.nlist == nlist
    assert torch.equal(layout.order.sort().values, torch.arange(n))  # a permutation
    off = layout.list_offsets
    assert off.shape == (nlist + 1,) and off[0] == 0 and off[-1] == n and (off.diff() >= 0).all()
    assigned = layout.assign(x)
    # clusters contiguous and in cluster order: sorted row r belongs to labels()[r]
    assert torch.equal(assigned[layout.order], layout.labels())
    assert torch.equal(torch.bincount(assigned, minlength=nlist), layout.list_sizes)
    for c in range(nlist):  # increasing item order within a cluster
        assert (layout.order[off[c] : off[c + 1]].diff() > 0).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 20), st.integers(1, 6), st.integers(0, 2**31))
def test_probe_returns_the_top_centroids_by_inner_product(nlist: int, b: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(max(nlist, 50), 5, generator=gen)
    layout = IVFLayout.build(x, nlist, iters=2, seed=seed % 7)
    queries = torch.randn(b, 5, generator=gen)
    nprobe = int(torch.randint(1, nlist + 1, (1,), generator=gen))
    probes = layout.probe(queries, nprobe)
    assert probes.shape == (b, nprobe) and probes.dtype == torch.int64
    scores = queries @ layout.centroids.T
    expected = scores.topk(nprobe, dim=1).values
    torch.testing.assert_close(scores.gather(1, probes), expected)
    assert all(len(set(row)) == nprobe for row in probes.tolist())


def test_errors() -> None:
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="at least"):
        kmeans(x, 11)
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        IVFLayout.build(bad, 2)
    layout = IVFLayout.build(x, 3)
    with pytest.raises(ValueError, match="nprobe"):
        layout.probe(torch.randn(1, 3), 4)
    with pytest.raises(ValueError):
        layout.assign(torch.randn(2, 4))
    with pytest.raises(ValueError):
        IVFLayout(layout.centroids, layout.order, layout.list_offsets[:-1])
