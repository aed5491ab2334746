"""The CPU filtered IVF scan of one batch, alone and inside ``ItemIndex.search``, on the catalogue of
``sterling bench ann`` (1M × 64 by default, per-query filters at 50%, 10% and 1%, k = 100, batch
256): what the kernel costs, what the search around it costs, and the same kernel call right after a
parallel torch op (the GNU OpenMP workers left spinning take a core from it). Medians of ``--repeat``
calls on the inputs a search hands the kernel.

sterling is imported before torch, so its ``GOMP_SPINCOUNT`` default applies (as it does for the
``sterling`` command); a program that imports torch first runs with GNU OpenMP's own, far longer
spin: ``GOMP_SPINCOUNT=300000 python bench/ivf_kernel.py`` shows what that costs.

Usage: python bench/ivf_kernel.py [--n 1000000] [--nprobe 64] [--json runs/ivf_kernel.json]
"""
# isort: skip_file

from __future__ import annotations

import sterling.index.segment as segment  # first: sets GOMP_SPINCOUNT before torch loads

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sterling.bench.ann import AnnBenchConfig, make_catalogue
from sterling.index.item_index import IndexConfig, ItemIndex
from sterling.ops.ivf_scan import ivf_scan


def median_ms(fn, repeat: int, before=lambda: None) -> float:
    fn()
    times = []
    for _ in range(repeat):
        before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--nprobe", type=int, default=64)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    cfg = AnnBenchConfig(n=args.n)
    cat = make_catalogue(cfg)
    index = ItemIndex.build(cat.embeddings, cat.attributes, config=IndexConfig(nlist=cfg.nlist))
    queries = torch.from_numpy(cat.queries)
    spare = torch.randn(256, 1024)  # a parallel torch op's input (256 × 1024 > torch's grain size)
    captured: list[tuple[tuple, dict]] = []
    in_search: list[float] = []

    def recording(*a, **kw):
        captured.append((a, kw))
        t0 = time.perf_counter()
        out = ivf_scan(*a, **kw)
        in_search.append(time.perf_counter() - t0)
        return out

    rows = []
    segment.ivf_scan = recording
    for label, filters in cat.filters.items():
        search = lambda f=filters: index.search(queries, k=cfg.k, filter=f, nprobe=args.nprobe)  # noqa: E731
        captured.clear()
        search()
        calls = list(captured)  # a search's kernel calls (a second one for queries short of results)
        kernel = lambda c=calls: [ivf_scan(*a, **kw) for a, kw in c]  # noqa: E731
        in_search.clear()
        search_ms = median_ms(search, args.repeat)
        per_search = np.add.reduceat(in_search, np.arange(0, len(in_search), len(calls)))
        row = {
            "selectivity": label,
            "search_ms": search_ms,
            "kernel_in_search_ms": 1e3 * float(np.median(per_search)),
            "kernel_alone_ms": median_ms(kernel, args.repeat),
            "kernel_after_torch_op_ms": median_ms(kernel, args.repeat, lambda: spare.sum()),
            "kernel_calls_per_search": len(calls),
        }
        rows.append(row)
        print(
            f"{label:>4}  search {row['search_ms']:6.1f} ms  kernel in search {row['kernel_in_search_ms']:6.1f}  "
            f"alone {row['kernel_alone_ms']:6.1f}  after a torch op {row['kernel_after_torch_op_ms']:6.1f}  "
            f"(kernel calls per search {row['kernel_calls_per_search']})",
            flush=True,
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"n": args.n, "nprobe": args.nprobe, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
