"""Item attributes of a dataset's items.parquet, in the form the item index takes.

Example::

    from sterling.data.items import read_items
    ids, attributes, display = read_items("runs/synth")  # attributes[0] == {"category": "news", ...}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sterling.data.schema import ITEM_ID, DataError, DatasetPaths, read_roles, read_table


def read_items(path: str | Path) -> tuple[np.ndarray, list[dict], dict[str, list]]:
    """Read items.parquet (``path`` is the file or its dataset directory).

    Returns:
        ids: int64 [N] item ids, in file order, unique.
        attributes: N dicts, one per item, attribute column → value (a string, an int or a list of
            strings), e.g. ``{"genre": ["Drama", "War"], "year": 1995}``; a null value leaves its key out.
        display: display column → N values (e.g. ``{"title": [...]}``).
    """
    path = Path(path)
    file = DatasetPaths(path).items if path.is_dir() else path
    table = read_table(file, "items")
    roles = read_roles(table.schema, str(file))
    ids_column = table.column(ITEM_ID)
    if ids_column.null_count:
        raise DataError(f"{file}: column 'item_id' has {ids_column.null_count} null values")
    ids = ids_column.to_numpy().astype(np.int64)
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"{file}: item_id {unique[counts > 1][0]} appears {counts[counts > 1][0]} times")
    columns = {name: table.column(name).to_pylist() for name in roles.attributes}
    attributes = [
        {name: values[i] for name, values in columns.items() if values[i] is not None} for i in range(len(ids))
    ]
    display = {name: table.column(name).to_pylist() for name in roles.display}
    return ids, attributes, display
