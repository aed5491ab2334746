"""The Triton filtered int8 IVF scan against the brute force of ``test_ivf_scan``: on CUDA when
present, else on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py`` before any kernel module is imported)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton kernels need the [gpu] or [dev] extra (triton)")

from hypothesis import given, settings  # noqa: E402
from tests.ops.test_ivf_scan import brute_force, check_top_k, problems  # noqa: E402

from sterling.ops.ivf_scan import Kernel, ivf_scan  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on_device(p: dict) -> dict:
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in p.items()}


def run_triton(p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    args = on_device(p)
    args["program"] = p["program"]  # a PlanProgram: the kernel moves its tensors
    scores, rows = ivf_scan(**args, kernel=Kernel.TRITON)
    return scores.cpu(), rows.cpu()


@settings(max_examples=25, deadline=None)
@given(problems())
def test_triton_equals_brute_force(p: dict) -> None:
    scores, rows = run_triton(p)
    assert scores.shape == rows.shape == (p["queries"].shape[0], p["k"])
    check_top_k(scores, rows, brute_force(p), p["k"])


@pytest.mark.parametrize("density", [0.0, 0.01, 0.5, 1.0])
@pytest.mark.parametrize("d", [1, 16, 64, 100, 128])
def test_mask_densities_and_dimensions(density: float, d: int) -> None:
    """Filters passing 0%, 1%, 50% and 100% of the rows, at every supported width."""
    from sterling.ops.plan_program import ANY, PlanProgram, pack_rows

    gen = torch.Generator().manual_seed(int(density * 100) + d)
    n, b = 400, 3
    p = dict(
        queries=torch.randn(b, d, generator=gen),
        codes=torch.randint(-127, 128, (n, d), generator=gen, dtype=torch.int8),
        scales=torch.rand(n, generator=gen) + 0.01,
        list_offsets=torch.tensor([0, 90, 250, 250, 400]),
        probes=torch.tensor([[0, 1, 3], [2, 3, -1], [1, -1, -1]]),
        k=50,
        bits=pack_rows(torch.rand(n, generator=gen) < density)[None],
        plan_of=torch.tensor([0, 0, -1]),
        program=PlanProgram(torch.tensor([[ANY, 0, 1]]), torch.tensor([0]), torch.tensor([0, 1]), 1),
        alive=None,
    )
    scores, rows = run_triton(p)
    check_top_k(scores, rows, brute_force(p), p["k"])


def test_k_beyond_the_probed_rows_pads():
    codes = torch.randint(-127, 128, (100, 8), dtype=torch.int8)
    p = dict(
        queries=torch.ones(2, 8),
        codes=codes,
        scales=torch.ones(100),
        list_offsets=torch.tensor([0, 40, 100]),
        probes=torch.tensor([[0, 1], [1, -1]]),
        k=10_000,
        bits=None,
        program=None,
        plan_of=None,
        alive=None,
    )
    scores, rows = run_triton(p)
    assert (rows[0] >= 0).sum() == 100 and (rows[1] >= 0).sum() == 60 and scores.shape == (2, 10_000)


_COMPILE_FOR_HOPPER = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sterling.ops.triton import ivf_scan as module

has_alive = sys.argv[1] == "1"
pointers = dict(queries="*fp32", codes="*i8", scales="*fp32", list_offsets="*i64", probes="*i64", bits="*i64",
                ops="*i64", leaf_rows="*i64", starts="*i64", plan_of="*i64", alive="*i64", out="*fp32")
constants = dict(HAS_ALIVE=has_alive, DEPTH=4, BLOCK=64, D_BLOCK=128)
signature = {**pointers, "P": "i32", "W": "i32", "D": "i32", "max_list": "i32", **{c: "constexpr" for c in constants}}
compiled = triton.compile(ASTSource(fn=module._scan_kernel, signature=signature, constexprs=constants),
                          target=GPUTarget("cuda", 90, 32))
print(".entry _scan_kernel" in compiled.asm["ptx"])
"""


@pytest.mark.parametrize("has_alive", [True, False])
def test_kernel_compiles_for_hopper(has_alive: bool) -> None:
    """The interpreter runs Python the compiler rejects (``and`` on tensors, loop-carried types):
    compile the kernel to PTX for sm_90 (H100/H200) too; ptxas ships with triton, no GPU needed. In
    a process of its own without the interpreter (which, since Triton 3.9, patches the language
    for the whole process)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_HOPPER, "1" if has_alive else "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "True"
