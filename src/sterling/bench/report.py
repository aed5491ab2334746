"""What every benchmark shares: its declaration as a ``sterling bench`` sub-command
(:class:`Benchmark`, one ``BENCHMARK`` per module, from which :mod:`sterling.cli` builds the
sub-commands) and the JSON file beside its printed table."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Benchmark", "comma_list", "mean_se", "write_json"]


@dataclass(frozen=True)
class Benchmark:
    """One ``sterling bench NAME`` sub-command.

    Args:
        name (str): the sub-command.
        help (str): its line in ``sterling bench --help``.
        add_arguments (Callable[[argparse.ArgumentParser], None]): adds its options to a parser.
        run (Callable[[argparse.Namespace], int]): runs it on the parsed options; the exit status.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def comma_list(text: str, option: str, kind: type = str) -> tuple:
    """The non-empty items of a comma-separated option value, each converted by ``kind``; a
    ValueError naming ``option`` when one does not convert or none is given."""
    try:
        values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        noun = {int: "integers", float: "numbers"}.get(kind, f"{kind.__name__} values")
        raise ValueError(f"{option} takes comma-separated {noun}, got {text!r}") from None
    if not values:
        raise ValueError(f"{option} names nothing: {text!r}")
    return values


def write_json(path: str | Path | None, result: dict) -> None:
    """Write ``result`` to ``path`` (parents created) and say so; nothing when ``path`` is None."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """The mean and the standard error of the mean (None with one value)."""
    a = np.asarray(values, dtype=np.float64)
    se = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else None
    return float(a.mean()), se
