"""One query of a published model, rendered for people: ``sterling query`` and the demo's queries.

The user's history and features come from the dataset's users.parquet, the items' titles from its
items.parquet when it has them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from sterling.retrieval.model import RetrievalModel

__all__ = ["format_recommendations"]


def format_recommendations(
    rec: RetrievalModel,
    user: int | None,
    history: str | None,
    filter: str | None,
    k: int,
    data: str | None,
    as_json: bool,
    exclude_seen: bool = True,
) -> str:
    """Run one query of ``rec`` and render it as a table (or JSON): for ``user`` (their history and
    features from ``data``, default the dataset the model was trained on) or for ``history``
    (comma-separated item ids, oldest first), at most ``k`` items passing ``filter``, none of the
    history's unless ``exclude_seen`` is False."""
    features: dict[str, int] = {}
    data_dir = Path(data) if data else Path(rec.meta["source"]["data_dir"] or "")
    if history is not None:
        items = np.array([int(x) for x in history.split(",") if x.strip()], dtype=np.int64)
        actions = None
    else:
        items, actions, stored = _user_history(data_dir, user, rec.config.max_history)
        features = {f: v for f, v in stored.items() if f in rec.config.features}  # those the model reads
    k = min(k, rec.config.k0)
    res = rec.recommend(
        items.tolist(),
        filter=filter,
        k=k,
        actions=None if actions is None else actions.tolist(),
        features=features,
        exclude_seen=exclude_seen,
    )
    ids = [i for i in res.ids[0].tolist() if i >= 0]
    scores = res.scores[0, : len(ids)].tolist()
    attrs = rec.index.attributes_of(ids) if ids else []
    titles = _titles(data_dir / "items.parquet", ids)
    if as_json:
        return json.dumps(
            {
                "user": user,
                "filter": filter,
                "k": k,
                "results": [
                    {"id": i, "score": s, "attributes": a, **({"title": titles[i]} if i in titles else {})}
                    for i, s, a in zip(ids, scores, attrs)
                ],
            }
        )
    head = f"user {user}" if user is not None else f"history of {len(items)} items"
    lines = [f"{head} · filter: {filter or '(none)'} · {len(ids)} of k={k}"]
    if not ids:
        lines.append("  (no item passes the filter)")
    for rank, (i, s, a) in enumerate(zip(ids, scores, attrs), 1):
        desc = "  ".join(f"{f}={_show(v)}" for f, v in sorted(a.items()))
        title = f"{titles[i][:40]:<40}  " if titles else ""
        lines.append(f"  {rank:>3}  {i:>8}  {s:7.4f}  {title}{desc}")
    return "\n".join(lines)


def _user_history(data_dir: Path, user: int, max_len: int) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """A user's latest ``max_len`` timeline events (item ids, actions) and encoded user features."""
    import pyarrow.parquet as pq

    from sterling.data.batch import encode_categorical
    from sterling.data.schema import DatasetPaths, read_roles

    path = DatasetPaths(data_dir).users
    table = pq.read_table(path, filters=[("user_id", "=", user)])
    if table.num_rows == 0:
        raise ValueError(f"user {user} is not in {path}")
    roles = read_roles(pq.read_schema(path))
    items = np.asarray(table.column("timeline_item_id")[0].as_py(), dtype=np.int64)[-max_len:]
    actions = np.asarray(table.column("timeline_action")[0].as_py(), dtype=np.int64)[-max_len:]
    feats = {f: int(encode_categorical(table.column(f))[0]) for f in roles.user}
    return items, actions, feats


def _titles(items_path: Path, ids: list[int]) -> dict[int, str]:
    """Titles of ``ids`` from a dataset's items.parquet, when it is at hand and has a title column."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not ids or not items_path.is_file() or "title" not in pq.read_schema(items_path).names:
        return {}
    table = pq.read_table(items_path, columns=["item_id", "title"])
    table = table.filter(pc.is_in(table["item_id"], pa.array(ids, pa.int64())))
    return dict(zip(table["item_id"].to_pylist(), table["title"].to_pylist()))


def _show(value) -> str:
    return "|".join(map(str, value)) if isinstance(value, list) else str(value)
