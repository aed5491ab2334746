"""What every benchmark does with its result: the JSON file beside the printed table."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_json"]


def write_json(path: str | Path | None, result: dict) -> None:
    """Write ``result`` to ``path`` (parents created) and say so; nothing when ``path`` is None."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
