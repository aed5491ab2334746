"""How far a filtered scan runs from this machine's floor: the peaks of an int8 matrix product and of
a memory read, measured in the same run, and the nominal work of a batch of searches.

The filtered int8 IVF scan does, per query, one int8 multiply-add per dimension of every row of
its probed lists (2 operations), and reads the codes (and scales) of every list the batch probes
at least once. Divided by the measured time these give an achieved GOP/s and GB/s; beside the
peaks they say how much of the hardware a configuration uses: a scan near the int8 peak can only
go faster by scanning fewer rows, one far below both is paying for something else (Python, the
filter words, the per-row exact scores).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sterling.index.item_index import ItemIndex
from sterling.ops.nearest_lists import nearest_lists

__all__ = ["Peaks", "ScanWork", "measure_peaks", "scan_work"]


@dataclass(frozen=True)
class Peaks:
    """int8 GEMM operations per second and bytes read per second, in billions (all threads)."""

    int8_gops: float
    read_gbps: float


@dataclass(frozen=True)
class ScanWork:
    """The nominal work of one batch: int8 operations (2 per dimension of every row each query
    scores) and bytes (the codes and scales of every row the batch scores, read once)."""

    ops: float
    bytes: float


def _best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_peaks(repeats: int = 5) -> Peaks:
    """The int8 peak: ``torch._int_mm`` of 2048 × 1024 by 1024 × 2048 (oneDNN's VNNI kernels where
    the CPU has them); the read peak: the sum of a 512 MiB float32 tensor (larger than any cache).
    Both on torch's threads, best of ``repeats``."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (2048, 1024), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (1024, 2048), generator=gen, dtype=torch.int8)
    gemm = _best_seconds(lambda: torch._int_mm(a, b), repeats)
    big = torch.ones(128 * 2**20, dtype=torch.float32)
    read = _best_seconds(lambda: big.sum(), repeats)
    return Peaks(2 * 2048 * 1024 * 2048 / gemm / 1e9, big.numel() * 4 / read / 1e9)


def scan_work(index: ItemIndex, queries: torch.Tensor, filters: list[str | None], k: int, nprobe: int) -> ScanWork:
    """The work of ``index.search(queries, k, filters, nprobe)`` as planned (its ``explain``): a
    probed or scanned filter's queries score every row of their first probed lists (before any
    widening of a query short of results), and the batch reads each such list once; a gathered
    filter's queries score its estimated passing rows, read once."""
    records = index.search(queries, k, filters, nprobe, explain=True).explain
    tensors = index.executor_tensors()
    centroids, row_list = tensors["centroids"], tensors["row_list"]
    nlist, dim = centroids.shape
    sizes = torch.bincount(row_list, minlength=nlist).double()  # [nlist]
    ops = nbytes = 0.0
    probes = torch.zeros(len(filters), dtype=torch.int64)
    for record in records:
        if "filter" not in record or record["plan"] == "none":
            continue
        mine = torch.tensor([f == record["filter"] for f in filters])
        if record["plan"] == "gather":
            rows = record["estimated_selectivity"] * len(index)
            ops += 2 * dim * rows * int(mine.sum())
            nbytes += rows * (dim + 4)
        else:
            probes[mine] = record["nprobe"]
    widest = int(probes.max()) if len(probes) else 0
    if widest:
        lists = nearest_lists(queries.float(), centroids, min(widest, nlist))  # [B, P], the search's probe
        probed = torch.arange(lists.shape[1]) < probes[:, None]  # [B, P]
        touched = torch.zeros(nlist, dtype=torch.bool)
        touched[lists[probed]] = True
        ops += float(2 * dim * sizes[lists].masked_fill(~probed, 0).sum())
        nbytes += float(sizes[touched].sum() * (dim + 4))
    return ScanWork(float(ops), float(nbytes))
