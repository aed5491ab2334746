"""The held-out split of request-level data: each user's latest request (users with at least two
requests) is held out; a model trains on the rest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

__all__ = ["holdout_requests"]


def holdout_requests(requests_path: Path) -> np.ndarray:
    """Request ids ``int64 [H]``: the latest request of every user who has at least two."""
    t = pq.read_table(requests_path, columns=["request_id", "user_id", "ts"]).sort_by(
        [("user_id", "ascending"), ("ts", "ascending"), ("request_id", "ascending")]
    )
    users = t.column("user_id").to_numpy()
    ids = t.column("request_id").to_numpy()
    last = np.flatnonzero(np.append(users[1:] != users[:-1], True))
    first = np.flatnonzero(np.insert(users[1:] != users[:-1], 0, True))
    return ids[last[last != first]]
