"""Progress of a training loop, and the thread count it runs with.

:func:`progress_bar` is a tqdm bar on stderr: redrawn every second on a terminal, and every 30
seconds, as plain ``\\r``-separated lines, when stderr is a file or a pipe (so ``tail -f`` of a log
shows where a long epoch is). :func:`default_threads` is the number of CPUs this process may run
on (its affinity mask, within a cgroup CPU quota), what :func:`set_threads` gives torch unless told
otherwise: torch's own default counts the machine's cores, and on a shared or containerised
machine more threads than the CPUs granted make every step wait on the others (an HSTU epoch on
2 busy cores took 150 s instead of 15-22 s).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

__all__ = ["default_threads", "progress_bar", "set_threads"]

#: Seconds between redraws when stderr is not a terminal.
FILE_INTERVAL_S = 30.0


def progress_bar(total: int, desc: str) -> tqdm:
    """A tqdm bar of ``total`` steps on stderr (module docstring); update with ``.update()``."""
    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        file=sys.stderr,
        leave=False,
        mininterval=1.0 if tty else FILE_INTERVAL_S,
        maxinterval=FILE_INTERVAL_S,
        dynamic_ncols=tty,
    )


def _cgroup_cpus(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """The CPUs a cgroup v2 quota grants (``"quota period"``, rounded up), None when unlimited or
    unreadable."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def default_threads() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpus()
    return max(1, min(cpus, quota) if quota else cpus)


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` (None: :func:`default_threads`); returns it."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    n = default_threads() if threads is None else threads
    torch.set_num_threads(n)
    return n
