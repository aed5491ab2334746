"""The roofline's nominal work of a batch: every probed row of every query, every probed list once."""

import numpy as np
import torch

from sterling.bench.roofline import ScanWork, scan_work
from sterling.index.item_index import IndexConfig, ItemIndex


def _index(n: int = 3000, d: int = 16, **config) -> ItemIndex:
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((n, d)).astype(np.float32))
    return ItemIndex.build(x, [{"c": f"v{i % 4}"} for i in range(n)], config=IndexConfig(nlist=8, **config))


def test_a_scan_reads_every_row_once_and_scores_it_for_every_query() -> None:
    index = _index()
    q = torch.randn(5, 16)
    work = scan_work(index, q, [None] * 5, k=10, nprobe=8)
    assert work == ScanWork(ops=2 * 16 * 3000 * 5, bytes=3000 * (16 + 4))


def test_probed_lists_count_per_query_and_once_per_batch() -> None:
    index = _index()
    q = torch.randn(6, 16)
    tensors = index.executor_tensors()
    sizes = torch.bincount(tensors["row_list"], minlength=8)
    top = torch.topk(q @ tensors["centroids"].T, 2, dim=1).indices
    work = scan_work(index, q, [None] * 6, k=10, nprobe=2)
    assert work.ops == 2 * 16 * int(sizes[top].sum())
    assert work.bytes == int(sizes[torch.unique(top)].sum()) * 20


def test_a_filter_nothing_passes_costs_nothing() -> None:
    assert scan_work(_index(), torch.randn(3, 16), ["c:none"] * 3, k=10, nprobe=4) == ScanWork(0.0, 0.0)


def test_a_gathered_filter_scores_its_passing_rows_only() -> None:
    """A shared filter answered by gathering its rows (a quarter of them) costs a quarter of a scan."""
    index = _index(gather_queries=2, gather_cost=0.0, gather_fixed=0.0)
    work = scan_work(index, torch.randn(10, 16), ["c:v1"] * 10, k=10, nprobe=8)
    assert abs(work.ops / (2 * 16 * 750 * 10) - 1) < 0.3 and abs(work.bytes / (750 * 20) - 1) < 0.3
