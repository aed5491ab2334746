"""The server's user store: each user's timeline and features from a dataset's ``users.parquet``,
so a request may name a user instead of carrying the history."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sterling.data.batch import encode_categorical
from sterling.data.schema import read_roles, validate_users

__all__ = ["UnknownUser", "UserStore", "encode_feature"]


class UnknownUser(KeyError):
    """A user id the store does not hold."""


@dataclass(frozen=True)
class UserStore:
    """Timelines of ``U`` users, flat with offsets (events oldest first).

    Attributes:
        user_ids (np.ndarray): int64 ``[U]`` ascending.
        offsets (np.ndarray): int64 ``[U + 1]``.
        items (np.ndarray): int64 ``[E]`` item ids.
        actions (np.ndarray): int64 ``[E]`` action bitmasks.
        features (dict[str, np.ndarray]): int64 ``[U]`` encoded user features.
    """

    user_ids: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    actions: np.ndarray
    features: dict[str, np.ndarray]

    @classmethod
    def read(cls, path: Path) -> UserStore:
        """The users of a ``users.parquet`` (schema checked)."""
        table = pq.read_table(path)
        roles, _ = validate_users(table.schema, str(path))
        table = table.sort_by("user_id")
        items = table.column("timeline_item_id").combine_chunks()
        offsets = items.offsets.to_numpy().astype(np.int64) - items.offsets[0].as_py()
        actions = table.column("timeline_action").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return cls(
            table.column("user_id").to_numpy().astype(np.int64),
            offsets,
            items.flatten().to_numpy(zero_copy_only=False).astype(np.int64),
            actions.astype(np.int64),
            {f: encode_categorical(table.column(f)) for f in read_roles(table.schema).user},
        )

    def __len__(self) -> int:
        return len(self.user_ids)

    def get(self, user_id: int, max_len: int) -> tuple[list[int], list[int], dict[str, int]]:
        """The latest ``max_len`` events (item ids, actions) of a user and their features."""
        u = int(np.searchsorted(self.user_ids, user_id))
        if u >= len(self.user_ids) or self.user_ids[u] != user_id:
            raise UnknownUser(user_id)
        start, end = self.offsets[u], self.offsets[u + 1]
        start = max(start, end - max_len)
        return (
            self.items[start:end].tolist(),
            self.actions[start:end].tolist(),
            {f: int(v[u]) for f, v in self.features.items()},
        )


def encode_feature(value: int | str) -> int:
    """A request's feature value encoded as training encoded its column
    (:func:`~sterling.data.batch.encode_categorical`): integers by magnitude, strings by CRC32."""
    if isinstance(value, str):
        return zlib.crc32(value.encode())
    return int(encode_categorical(pa.array([value], pa.int64()))[0])
