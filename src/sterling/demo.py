"""``sterling demo``: the whole flow on the built-in synthetic default.

synthetic request logs → storage in both formats → two-tower + OverArch training on request
batches → publish one snapshot (index, embedding cache, OverArch, Value Model) → filtered queries.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq

from sterling.data.schema import DatasetPaths
from sterling.data.stats import dataset_stats, format_stats
from sterling.data.synth import DEMO_VALUE, SynthConfig, generate
from sterling.query import format_recommendations
from sterling.retrieval.publish import load_model, publish
from sterling.train.loop import TrainConfig, train

__all__ = ["DEMO_FILTERS", "run_demo"]

#: Filters the demo shows: a broad one, a multi-valued IN with NOT, a numeric range, and an
#: unknown value (matches nothing, by design).
DEMO_FILTERS = (
    None,
    "language:en AND year >= 2010",
    "tags IN (music-live, gaming-live, comedy-daily) AND NOT region:na",
    "(category:sports OR category:fitness) AND creator <= 1020",
    "category:knitting",
)


def run_demo(workdir: Path, quick: bool = False) -> None:
    """Run the demo in ``workdir`` (replaced if it holds an earlier demo)."""
    t_start = time.perf_counter()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    synth = SynthConfig()
    if quick:
        synth = replace(synth, num_users=300, num_items=1000)
    train_cfg = TrainConfig(epochs=1) if quick else TrainConfig()

    _step(1, "synthesising request-level logs", t_start)
    data = generate(synth, workdir / "data")
    _step(2, "storage: request rows vs impression rows (zstd Parquet)", t_start)
    print(_indent(format_stats(dataset_stats(data))))
    _step(
        3, "training the two-tower model, then its OverArch, on request batches (user tower once per request)", t_start
    )
    report = train(data, workdir / "checkpoint", train_cfg, log=lambda s: print(_indent(s)))
    _step(
        4,
        "publishing one model: user tower + int8 IVF / Bloom index + embedding cache + OverArch + Value Model",
        t_start,
    )
    snapshot = publish(report.checkpoint, DatasetPaths(data).items, workdir / "snapshot", value_formula=DEMO_VALUE)
    print(_indent(f"{snapshot}"))
    _step(5, "filtered queries", t_start)
    rec = load_model(snapshot)
    users = pq.read_table(DatasetPaths(data).users, columns=["user_id"]).column("user_id").to_pylist()
    for user, flt in zip([users[0], users[len(users) // 2], users[-1]] * 2, DEMO_FILTERS):
        print(_indent(format_recommendations(rec, user, None, flt, 5, str(data), False)))
        print()
    print(
        f"demo finished in {time.perf_counter() - t_start:.0f}s; try:\n"
        f"  {_sterling_command()} query --snapshot {snapshot} --user {users[0]} --filter 'language:en' -k 10"
    )


def _sterling_command() -> str:
    """How to call ``sterling`` from this interpreter, on PATH or not (e.g. inside ``.venv``)."""
    script = Path(sys.executable).parent / "sterling"
    return os.path.relpath(script) if script.exists() else f"{sys.executable} -m sterling"


def _step(n: int, what: str, t0: float) -> None:
    print(f"[{n}/5] {what} (t={time.perf_counter() - t0:.0f}s)", flush=True)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
