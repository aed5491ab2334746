"""The served model as a ``torch.export`` program: the forward without sterling's model code.

:meth:`RetrievalModel.execute` (user tower → task queries → probe → exact filter mask → int8 scores →
top-K0 with widening → merge → OverArch → Value Model → top-K0) is traced once into an
``ExportedProgram`` whose constants hold the index and the embedding cache. Its inputs are plain
tensors (``B`` requests, ``L`` history events in all, both dynamic; ``T`` tasks, ``W`` = ⌈N/64⌉)::

    history_rows     int64 [L]      the index's rows of the history items (RetrievalModel.inputs)
    history_actions  int64 [L]
    history_offsets  int64 [B + 1]
    features         int64 [B, F]
    probes           int64 [B·T]    from RetrievalModel.plan (the host-side filter planner)
    allowed          int64 [B·T, W]

and its outputs ids int64 ``[B, K0]``, scores ``[B, K0]`` and task scores ``[B, K0, T]``: the top K0
(take the first k). ``B >= 2``: export specialises a dimension of size 1, so :func:`run_program`
answers a single request beside an empty one. The program runs the portable reference search (dense masked scoring over the
catalogue), so it answers like the eager model but without its fused kernels.

``program.pt2`` in a snapshot is this program saved with ``torch.export.save``; ``program.aoti.pt2``
(``publish(..., aot=True)``, where a C++ compiler is present) is the same program compiled ahead of
time by AOTInductor into a package that runs without Python model code
(``torch._inductor.aoti_load_package``; :func:`load_package`).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from sterling.retrieval.inputs import UserInputs
from sterling.retrieval.model import RetrievalModel

__all__ = ["aot_package", "check_compiler", "export_program", "load_package", "load_program", "run_program"]


class _Forward(nn.Module):
    """:meth:`RetrievalModel.execute` with tensor arguments only; the index's tensors and the cache
    (:meth:`RetrievalModel.static_tensors`) are its buffers, so the program's constants."""

    def __init__(self, model: RetrievalModel) -> None:
        super().__init__()
        self.model = model
        self.names = []
        for name, value in model.static_tensors().items():
            self.register_buffer(f"static_{name}", value, persistent=False)
            self.names.append(name)

    def forward(self, history_rows, history_actions, history_offsets, features, probes, allowed):
        inputs = UserInputs(history_rows, history_actions, history_offsets, features)
        static = {name: getattr(self, f"static_{name}") for name in self.names}
        out = self.model.execute(inputs, probes, allowed, self.model.config.k0, static)
        return out.ids, out.scores, out.task_scores


def _example(model: RetrievalModel) -> tuple[torch.Tensor, ...]:
    """Example inputs: 2 requests, 3 + 2 history events, no filter."""
    inputs = UserInputs(
        history_rows=torch.tensor([0, 1, 2, 0, 1]) % max(len(model.index), 1),
        history_actions=torch.ones(5, dtype=torch.int64),
        history_offsets=torch.tensor([0, 3, 5]),
        features=torch.zeros(2, len(model.config.features), dtype=torch.int64),
    )
    plan = model.plan(2, None)
    return (
        inputs.history_rows,
        inputs.history_actions,
        inputs.history_offsets,
        inputs.features,
        plan.probes,
        plan.allowed,
    )


def export_program(model: RetrievalModel) -> bytes:
    """``torch.export`` the whole forward of ``model`` and serialise it (``.pt2`` bytes)."""
    if model.ranker is not None:
        raise ValueError(
            "a model with a request-level ranker does not export yet (its jagged M-FALCON pass has "
            "data-dependent shapes): publish it without --export"
        )
    requests, events = torch.export.Dim("requests", min=2), torch.export.Dim("events", min=0)
    queries = requests * len(model.config.query_tasks)
    dynamic = ({0: events}, {0: events}, {0: requests + 1}, {0: requests}, {0: queries}, {0: queries})
    with torch.no_grad():
        program = torch.export.export(_Forward(model.eval()), _example(model), dynamic_shapes=dynamic)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def load_program(data: bytes) -> torch.export.ExportedProgram:
    """The program of :func:`export_program` (``.pt2`` bytes, e.g. a snapshot's ``program.pt2``)."""
    return torch.export.load(io.BytesIO(data))


def run_program(
    program, inputs: UserInputs, probes: torch.Tensor, allowed: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run an exported program (or its AOTInductor package): ids ``[B, k]``, scores ``[B, k]``,
    task scores ``[B, k, T]``. The program is traced for batches of two or more requests (export
    specialises a dimension of size 1); a single request is answered beside an empty padding
    request that probes nothing, whose answer is dropped."""
    b = inputs.batch_size
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    args = (inputs.history_rows, inputs.history_actions, inputs.history_offsets, inputs.features, probes, allowed)
    if b == 1:
        args = (
            inputs.history_rows,
            inputs.history_actions,
            torch.cat([inputs.history_offsets, inputs.history_offsets[-1:]]),
            torch.cat([inputs.features, torch.zeros_like(inputs.features)]),
            torch.cat([probes, torch.zeros_like(probes)]),
            torch.cat([allowed, torch.zeros_like(allowed)]),
        )
    call = program.module() if isinstance(program, torch.export.ExportedProgram) else program
    with torch.no_grad():
        ids, scores, task_scores = call(*args)
    if k > ids.shape[1]:
        raise ValueError(f"k = {k} is more than the program's {ids.shape[1]} results (k0 at publish)")
    return ids[:b, :k], scores[:b, :k], task_scores[:b, :k]


def check_compiler() -> None:
    """Raise ValueError unless a C++ compiler (``$CXX``, else ``g++``) is on the PATH."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise ValueError(f"AOTInductor needs a C++ compiler; {compiler!r} is not on the PATH (set CXX)")


def aot_package(program: bytes) -> bytes:
    """AOTInductor-compile the program of :func:`export_program` into a ``.pt2`` package (bytes).

    Raises:
        ValueError: no C++ compiler (:func:`check_compiler`).
    """
    check_compiler()
    with tempfile.TemporaryDirectory() as tmp:
        path = torch._inductor.aoti_compile_and_package(
            load_program(program), package_path=str(Path(tmp) / "model.pt2")
        )
        return Path(path).read_bytes()


def load_package(path: str | os.PathLike[str]):
    """The compiled model of an AOTInductor package (e.g. a snapshot's ``program.aoti.pt2``),
    called with the same tensors as the exported program."""
    return torch._inductor.aoti_load_package(str(path))
