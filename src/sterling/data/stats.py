"""Size and shape statistics of a dataset, with the on-disk cost of both formats side by side.

``dataset_stats`` takes a directory in either format, writes the other format into a temporary
directory (streaming, :mod:`sterling.data.group`), and reports per-request counts and the zstd
Parquet bytes per impression of each format. The request format counts requests.parquet plus
users.parquet; items.parquet is the same in both formats and is reported on its own.

The impression format is measured in both row orders (``IMPRESSION_ORDERS``, spec ``roo.md`` §7.4
"sorted vs unsorted"): ``time``, a log as a server writes it (the rows of a request together,
requests of all users interleaved), and ``user``, sorted by (user_id, ts, request_id, position).
The user order puts a user's copies of the history next to each other, where zstd finds them: it is
the "physical" de-duplication of spec §2.4, done by sorting instead of by the format.

Example::

    from sterling.data.stats import dataset_stats, format_stats
    print(format_stats(dataset_stats("runs/synth")))
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from sterling.data.group import IMPRESSION_ORDERS, impressions_to_requests, join_users, requests_to_impressions
from sterling.data.schema import IMPRESSIONS, USER_ID, DatasetPaths


def _counts(request_dir: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Impressions [R] and history lengths at request time [R] of every request, and the user count."""
    impressions, histories, users, last = [], [], 0, None
    for batch in join_users(request_dir):
        impressions.append(pc.list_value_length(batch.requests.column(IMPRESSIONS)).to_numpy())
        histories.append(batch.history_length)
        ids = batch.requests.column(USER_ID).to_numpy()  # sorted: count the changes of user
        users += np.count_nonzero(np.diff(ids)) + int(ids[0] != last)
        last = ids[-1]
    if not impressions:
        return np.empty(0, np.int64), np.empty(0, np.int64), 0
    return np.concatenate(impressions), np.concatenate(histories), users


def dataset_stats(path: str | Path) -> dict:
    """Statistics of the dataset directory ``path`` (request or impression format).

    Returns a dict: ``format``; ``requests``, ``impressions`` and ``users`` (users with a request);
    ``impressions_per_request`` and ``history_length`` (timeline events before the request's ts, per
    request) as {mean, p50, p90, max}; ``bytes`` and ``bytes_per_impression`` of the request format
    (``requests_format``), of the impression format in each row order (``impressions_time_order``,
    ``impressions_user_order``) and (``bytes`` only) of items.parquet; ``ratio``: {order:
    impression-format bytes in that order / request-format bytes}.
    """
    paths = DatasetPaths(path)
    fmt = paths.format
    with tempfile.TemporaryDirectory() as tmp:
        request_paths = (
            paths if fmt == "requests" else DatasetPaths(impressions_to_requests(paths.root, Path(tmp) / "requests"))
        )
        per_request, history, users = _counts(request_paths.root)
        size = {"requests_format": request_paths.requests.stat().st_size + request_paths.users.stat().st_size}
        for order in IMPRESSION_ORDERS:
            out = DatasetPaths(requests_to_impressions(request_paths.root, Path(tmp) / order, order=order))
            size[f"impressions_{order}_order"] = out.impressions.stat().st_size
    total = int(per_request.sum())
    return {
        "format": fmt,
        "requests": len(per_request),
        "impressions": total,
        "users": int(users),
        "impressions_per_request": _summary(per_request),
        "history_length": _summary(history),
        "bytes": {**size, "items": paths.items.stat().st_size},
        "bytes_per_impression": {name: value / max(total, 1) for name, value in size.items()},
        "ratio": {
            order: size[f"impressions_{order}_order"] / max(size["requests_format"], 1) for order in IMPRESSION_ORDERS
        },
    }


def _summary(values: np.ndarray) -> dict:
    if not len(values):
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "max": 0}
    p50, p90 = np.percentile(values, [50, 90])
    return {"mean": float(values.mean()), "p50": float(p50), "p90": float(p90), "max": int(values.max())}


def format_stats(stats: dict) -> str:
    """A readable table of :func:`dataset_stats` output."""
    ipr, hist = stats["impressions_per_request"], stats["history_length"]
    size, per = stats["bytes"], stats["bytes_per_impression"]

    def cost(name: str) -> str:
        return f"{size[name]:,} B  ({per[name]:.1f} B/impression)"

    rows = [
        ("source format", stats["format"]),
        ("requests", f"{stats['requests']:,}"),
        ("impressions", f"{stats['impressions']:,}"),
        ("users", f"{stats['users']:,}"),
        (
            "impressions/request",
            f"mean {ipr['mean']:.1f}  p50 {ipr['p50']:.0f}  p90 {ipr['p90']:.0f}  max {ipr['max']}",
        ),
        (
            "history at request",
            f"mean {hist['mean']:.1f}  p50 {hist['p50']:.0f}  p90 {hist['p90']:.0f}  max {hist['max']}",
        ),
        ("request format", cost("requests_format")),
        *(
            (
                f"impression format, {order} order",
                f"{cost(f'impressions_{order}_order')}  {stats['ratio'][order]:.2f}x the request format",
            )
            for order in IMPRESSION_ORDERS
        ),
        ("items.parquet", f"{size['items']:,} B"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
