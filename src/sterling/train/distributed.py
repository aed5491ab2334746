"""Data-parallel training (``sterling train --nproc N``): torch.distributed DDP, the batch sharded by
request.

Every rank reads the same stream of request batches (packed by token budget, so all ranks agree
on each batch) and computes the part of the loss of its contiguous share of the batch's requests,
balanced by tokens (:func:`shard_bounds`): the user tower runs once per request on the rank that
owns it. In-batch negatives, logQ counts and the same-user mask still span the whole batch
(``two_tower_loss(shard=...)``), so the ranks' losses add up to the single-process loss of that
batch; DDP averages gradients, so each rank back-propagates ``world × its loss`` and the update is
the single-process update of the same global batch (equal up to float summation order:
``tests/train/test_distributed.py``). Backend: gloo on CPU, nccl on GPU.

A leaf of :mod:`sterling.train`: the trainers call it (``sterling.train.loop.train_distributed``).

Example::

    from sterling.train.distributed import run_ranks
    report = run_ranks(train, (Path("runs/synth"), Path("runs/ckpt"), TrainConfig(), print), nproc=2)
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["rank_and_world", "run_ranks", "shard_bounds"]


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size: (0, 1) outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def shard_bounds(batch_tokens: np.ndarray, rank: int, world: int) -> tuple[int, int]:
    """Requests ``lo:hi`` of ``rank`` among ``world``: contiguous shares of a batch whose requests
    cost ``batch_tokens`` ``[R]`` tokens each, cut where the running total crosses each 1/world of
    the whole. Shares may be empty when R < world; together they cover 0:R once."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    cum = np.concatenate([[0], np.cumsum(batch_tokens)])
    cuts = np.searchsorted(cum, cum[-1] * np.arange(world + 1) / world, side="left")
    cuts[0], cuts[-1] = 0, len(batch_tokens)
    return int(cuts[rank]), int(cuts[rank + 1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, threads: int, fn: Callable, args: tuple, result_path: str) -> None:
    torch.set_num_threads(threads)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = fn(*args)
        if rank == 0:  # a file: a pipe would block on a large result until the parent, joining, reads it
            Path(result_path).write_bytes(pickle.dumps(result))
        dist.barrier()  # every rank done before any tears its gloo pairs down (a rank torn down early aborted its peer)
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, args: tuple, nproc: int):
    """Run ``fn(*args)`` in ``nproc`` spawned processes joined in one process group (127.0.0.1);
    returns rank 0's result. ``fn`` must be importable (a module-level function)."""
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, not {nproc}")
    threads = max(1, (os.cpu_count() or 1) // nproc)
    with tempfile.TemporaryDirectory(prefix="sterling-ranks-") as tmp:
        result_path = str(Path(tmp) / "rank0.pickle")
        mp.start_processes(
            _worker,
            args=(nproc, _free_port(), threads, fn, args, result_path),
            nprocs=nproc,
            join=True,
            start_method="spawn",
        )
        return pickle.loads(Path(result_path).read_bytes())
