"""Test-wide settings: without CUDA, Triton kernels run in Triton's CPU interpreter (the variable
must be set before a kernel module is imported, so it is set here, once)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
