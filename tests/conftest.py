"""Test-wide settings: without CUDA, Triton kernels run in Triton's CPU interpreter (the variable
must be set before a kernel module is imported, so it is set here, once); numba's on-disk cache is
cleared when a source file is newer than it."""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _clear_stale_numba_cache(package: Path) -> None:
    """numba's cache (``cache=True``) checks only the source file of the function it compiled, so a
    kernel whose callee lives in another module (``sterling.ops.cpu.keys``, ``vnni``, ...) keeps
    its old compiled callee after that module is edited: tests would run stale code. Any source
    newer than the oldest cached entry clears them all (a clean checkout, as in CI, has none)."""
    cached = [*package.rglob("*.nbi"), *package.rglob("*.nbc")]
    if cached and max(p.stat().st_mtime for p in package.rglob("*.py")) > min(p.stat().st_mtime for p in cached):
        for path in cached:
            path.unlink(missing_ok=True)


_clear_stale_numba_cache(Path(__file__).resolve().parents[1] / "src" / "sterling")


@pytest.fixture
def one_thread():
    """torch on one thread for the test (training tests: deterministic sums, no oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
