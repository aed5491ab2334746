"""GPU benchmark of the filtered int8 IVF scan (``bench/gpu.sh`` runs it on a lent H100/H200).

Data, built on the GPU in seconds: ``n`` items in ``d`` dimensions drawn around ``nlist`` random
unit centres (a Gaussian mixture, so inverted lists mean something), per-item int8 codes, lists
from one nearest-centre assignment (cluster-sorted, as the index stores them), one Bloom bit row
set for ``selectivity`` of the items and a one-leaf plan over it. Queries come from the same
mixture. For batch sizes, k and nprobe it times (CUDA events, median of ``repeats`` after a
warm-up):

* ``sterling-triton``: :func:`sterling.ops.triton.ivf_scan.ivf_scan`, the kernel behind
  ``Kernel.TRITON`` (the probe selection, a [B, nlist] product and a top-P, included);
* ``torch-gather``: the same search in plain PyTorch on the GPU (gather the probed rows' codes,
  batched product, mask, ``torch.topk``), the natural baseline;
* the **bandwidth floor**: the bytes the scan must read (codes, scales, Bloom words of the probed
  rows) over the card's measured device-to-device copy bandwidth.

Recall@k of both systems is against the exact filtered top-k over all items (scores of the stored
int8 vectors); sterling and torch-gather compute the same candidates, so they agree. FAISS-GPU is
not measured: its wheel is several hundred MB, beyond what a lent machine can be sent.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time

import torch

from sterling.bench.report import write_json
from sterling.ops.plan_program import ANY, PlanProgram
from sterling.ops.triton.ivf_scan import ivf_scan as triton_scan


def _timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up (CUDA events on GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _copy_bandwidth(device: str) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    x = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    seconds = _timed(lambda: x.clone(), 5)
    return 2 * x.numel() / seconds


def make_data(n: int, d: int, nlist: int, selectivity: float, queries: int, device: str, seed: int = 0) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(nlist, d, device=device, generator=gen), dim=1)

    def sample(m: int) -> torch.Tensor:
        pick = torch.randint(0, nlist, (m,), device=device, generator=gen)
        return centres[pick] + 0.3 / math.sqrt(d) * torch.randn(m, d, device=device, generator=gen)

    x = torch.cat([sample(min(1 << 20, n - s)) for s in range(0, n, 1 << 20)])
    assign = torch.cat([(x[s : s + (1 << 20)] @ centres.T).argmax(1) for s in range(0, n, 1 << 20)])
    order = torch.argsort(assign)
    x, assign = x[order], assign[order]
    scales = x.abs().amax(1) / 127
    codes = torch.round(x / scales[:, None]).clamp(-127, 127).to(torch.int8)
    del x
    counts = torch.bincount(assign, minlength=nlist)
    offsets = torch.zeros(nlist + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(counts, 0)
    passing = torch.rand(n, device=device, generator=gen) < selectivity
    words = (n + 63) // 64
    padded = torch.zeros(words * 64, dtype=torch.int64, device=device)
    padded[:n] = passing.long()
    bits = (padded.view(words, 64) << torch.arange(64, device=device)).sum(1)[None]  # [1, W]
    program = PlanProgram(torch.tensor([[ANY, 0, 1]]), torch.tensor([0]), torch.tensor([0, 1]), 1)
    return dict(
        codes=codes,
        scales=scales,
        offsets=offsets,
        bits=bits,
        passing=passing,
        program=program,
        centres=centres,
        queries=sample(queries),
        max_list=int(counts.max()),
    )


def exact(data: dict, q: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of the exact filtered top-k over every item (stored int8 vectors), [B, k]."""
    best_s = torch.full((q.shape[0], 0), float("-inf"), device=q.device)
    best_r = torch.zeros((q.shape[0], 0), dtype=torch.int64, device=q.device)
    n = data["codes"].shape[0]
    for s in range(0, n, 1 << 20):
        e = min(n, s + (1 << 20))
        sc = (q @ data["codes"][s:e].float().T) * data["scales"][s:e]
        sc = sc.masked_fill(~data["passing"][s:e], float("-inf"))
        top = torch.topk(sc, min(k, e - s), dim=1)
        best_s, idx = torch.topk(
            torch.cat([best_s, top.values], 1), min(k, best_s.shape[1] + top.values.shape[1]), dim=1
        )
        best_r = torch.cat([best_r, top.indices + s], 1).gather(1, idx)
    return best_r


def probes_of(data: dict, q: torch.Tensor, nprobe: int) -> torch.Tensor:
    return torch.topk(q @ data["centres"].T, nprobe, dim=1).indices


def sterling_search(data: dict, q: torch.Tensor, k: int, nprobe: int) -> torch.Tensor:
    plan_of = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
    return triton_scan(
        q,
        data["codes"],
        data["scales"],
        data["offsets"],
        probes_of(data, q, nprobe),
        k,
        data["bits"],
        data["program"],
        plan_of,
        None,
        max_list=data["max_list"],
    )[1]


def torch_search(data: dict, q: torch.Tensor, k: int, nprobe: int, budget: int = 1 << 31) -> torch.Tensor:
    """Plain PyTorch on the same device: gather every probed row (padded to the longest list),
    queries in chunks whose gathered float codes stay under ``budget`` bytes."""
    chunk = max(1, budget // (nprobe * data["max_list"] * q.shape[1] * 4))
    return torch.cat([_torch_chunk(data, q[s : s + chunk], k, nprobe) for s in range(0, q.shape[0], chunk)])


def _torch_chunk(data: dict, q: torch.Tensor, k: int, nprobe: int) -> torch.Tensor:
    probes = probes_of(data, q, nprobe)  # [B, P]
    start = data["offsets"][probes]  # [B, P]
    size = data["offsets"][probes + 1] - start
    j = torch.arange(data["max_list"], device=q.device)
    rows = (start[..., None] + j).view(q.shape[0], -1)  # [B, P·L]
    valid = (j < size[..., None]).view(q.shape[0], -1)
    rows = torch.where(valid, rows, 0)
    scores = torch.einsum("bd,bld->bl", q, data["codes"][rows].float()) * data["scales"][rows]
    scores = scores.masked_fill(~(valid & data["passing"][rows]), float("-inf"))
    top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    return torch.where(torch.isfinite(top.values), rows.gather(1, top.indices), -1)


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    hits = sum(len(set(a.tolist()) & set(b.tolist()) - {-1}) for a, b in zip(found.cpu(), truth.cpu()))
    return hits / truth.numel()


def run(
    n: int,
    d: int,
    nlist: int,
    selectivity: float,
    batches: list[int],
    ks: list[int],
    nprobes: list[int],
    device: str,
    repeats: int,
    systems: tuple[str, ...],
    log=print,
) -> dict:
    t0 = time.perf_counter()
    data = make_data(n, d, nlist, selectivity, max(batches), device)
    log(f"data: {n:,} × {d}, {nlist} lists (longest {data['max_list']:,}), built in {time.perf_counter() - t0:.1f}s")
    bandwidth = _copy_bandwidth(device) if device == "cuda" else float("nan")
    mean_list = n / nlist
    rows = []
    for batch in batches:
        q = data["queries"][:batch]
        for k in ks:
            truth = exact(data, q, k)
            for nprobe in nprobes:
                touched = batch * nprobe * mean_list * (d + 4 + 8 / 64)
                floor = touched / bandwidth
                for system in systems:
                    search = sterling_search if system == "sterling-triton" else torch_search
                    try:
                        seconds = _timed(functools.partial(search, data, q, k, nprobe), repeats)
                        row = {
                            "system": system,
                            "batch": batch,
                            "k": k,
                            "nprobe": nprobe,
                            "n": n,
                            "d": d,
                            "selectivity": selectivity,
                            "seconds": seconds,
                            "qps": batch / seconds,
                            "recall": recall(search(data, q, k, nprobe), truth),
                            "floor_seconds": floor,
                            "bytes_touched": touched,
                        }
                    except torch.OutOfMemoryError as e:
                        row = {"system": system, "batch": batch, "k": k, "nprobe": nprobe, "error": str(e)[:200]}
                        torch.cuda.empty_cache()
                    rows.append(row)
                    log(json.dumps(row))
    info = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "copy_bandwidth_bytes_per_s": bandwidth,
    }
    return {"machine": info, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--nlist", type=int, default=4096)
    p.add_argument("--selectivity", type=float, default=0.1)
    p.add_argument("--batches", default="16,256")
    p.add_argument("--ks", default="1024,2048")
    p.add_argument("--nprobes", default="16,64,256")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--systems", default="sterling-triton,torch-gather")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", dest="json_path")
    a = p.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    result = run(
        a.n,
        a.d,
        a.nlist,
        a.selectivity,
        ints(a.batches),
        ints(a.ks),
        ints(a.nprobes),
        a.device,
        a.repeats,
        tuple(a.systems.split(",")),
    )
    write_json(a.json_path, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
