"""Test-wide settings: without CUDA, Triton kernels run in Triton's CPU interpreter (the variable
must be set before a kernel module is imported, so it is set here, once)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """torch on one thread for the test (training tests: deterministic sums, no oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
