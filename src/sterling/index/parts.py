"""An :class:`~sterling.index.item_index.ItemIndex` as JSON metadata and named tensors (the
snapshot parts it is saved as, alone or inside a served model's snapshot), read back with every
shape and dtype checked."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sterling.index.attributes import AttributeStore
from sterling.index.bloom import BloomIndex
from sterling.index.checks import check_unique
from sterling.index.config import IndexConfig
from sterling.index.id_map import IdMap
from sterling.index.quant import Int8Codes
from sterling.index.segment import Segment
from sterling.index.state import FreshRows, IndexState
from sterling.ops.plan_program import pack_rows

__all__ = ["state_from_parts", "state_to_parts"]

_FORMAT = 2


def state_to_parts(state: IndexState, config: IndexConfig) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An index's state as JSON metadata and named tensors (the live fresh rows kept; the item
    table is the served model's, not the index's)."""
    main, fresh = state.main, state.fresh.kept(torch.nonzero(state.fresh.live).view(-1))
    meta = {
        "format": _FORMAT,
        "config": config.to_json(),
        "num_items": len(main),
        "num_fresh": len(fresh.ids),
        "dim": main.centroids.shape[1],
        "attributes": main.attributes.meta(),
        "bloom": main.bloom.meta(),
        "fresh_attributes": fresh.attributes.meta(),
    }
    tensors = {
        "codes": main.codes.codes,
        "scales": main.codes.scales,
        "ids": main.ids,
        "centroids": main.centroids,
        "list_offsets": main.list_offsets,
        "alive": pack_rows(torch.ones(len(main), dtype=torch.bool)) if state.alive is None else state.alive,
        "fresh.ids": fresh.ids,
        "fresh.codes": fresh.codes.codes,
        "fresh.scales": fresh.codes.scales,
    }
    tensors.update({f"attr.{k}": v for k, v in main.attributes.to_tensors().items()})
    tensors.update({f"bloom.{k}": v for k, v in main.bloom.to_tensors().items()})
    tensors.update({f"fresh_attr.{k}": v for k, v in fresh.attributes.to_tensors().items()})
    return meta, tensors


def state_from_parts(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> tuple[IndexState, IndexConfig]:
    """The state and config of :func:`state_to_parts`' output, every shape and dtype checked (a
    ValueError names the first that is wrong)."""
    try:
        if meta["format"] != _FORMAT:
            raise ValueError(f"unsupported item index format {meta['format']!r} (this build reads {_FORMAT})")
        config = IndexConfig(**meta["config"])
        n, f, d = int(meta["num_items"]), int(meta["num_fresh"]), int(meta["dim"])
        nlist = tensors["centroids"].shape[0]
        _check_part(tensors, "codes", torch.int8, (n, d))
        _check_part(tensors, "scales", torch.float32, (n,))
        _check_part(tensors, "ids", torch.int64, (n,))
        _check_part(tensors, "centroids", torch.float32, (nlist, d))
        _check_part(tensors, "list_offsets", torch.int64, (nlist + 1,))
        _check_part(tensors, "alive", torch.int64, ((n + 63) // 64,))
        _check_part(tensors, "fresh.ids", torch.int64, (f,))
        _check_part(tensors, "fresh.codes", torch.int8, (f, d))
        _check_part(tensors, "fresh.scales", torch.float32, (f,))
        offsets = tensors["list_offsets"]
        if nlist < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != n or bool((offsets.diff() < 0).any()):
            raise ValueError(f"list_offsets must rise from 0 to {n}")
        attributes = AttributeStore.from_parts(meta["attributes"], _prefixed(tensors, "attr."))
        bloom = BloomIndex.from_parts(meta["bloom"], _prefixed(tensors, "bloom."))
        fresh_attributes = AttributeStore.from_parts(meta["fresh_attributes"], _prefixed(tensors, "fresh_attr."))
    except (KeyError, TypeError) as e:
        raise ValueError(f"item index snapshot parts are malformed: {e!r}") from None
    if len(attributes) != n or len(bloom) != n or len(fresh_attributes) != f:
        raise ValueError("attribute store, Bloom index and codes disagree on the number of items")
    ids = tensors["ids"]
    fresh_ids = tensors["fresh.ids"]
    check_unique(torch.cat([ids, fresh_ids]))
    main = Segment.from_sorted(
        Int8Codes(tensors["codes"], tensors["scales"]),
        ids,
        tensors["centroids"],
        offsets,
        attributes,
        config,
        bloom,
    )
    alive = tensors["alive"]
    full = bool((alive == pack_rows(torch.ones(n, dtype=torch.bool))).all())
    fresh = FreshRows(
        fresh_ids,
        Int8Codes(tensors["fresh.codes"], tensors["fresh.scales"]),
        fresh_attributes,
        torch.ones(f, dtype=torch.bool),
        IdMap.build(fresh_ids),
        None,
    )
    state = IndexState(main, None if full else alive, fresh, None)
    if not full:  # a deleted main row may not hold an id a fresh item also holds
        check_unique(torch.cat([main.ids[state.live_rows], fresh_ids]))
    return state, config


def _prefixed(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _check_part(tensors: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = tensors[name]
    if t.dtype != dtype or tuple(t.shape) != shape:
        short = str(dtype).removeprefix("torch.")
        raise ValueError(
            f"{name} should be {short} {list(shape)}, got {str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
        )
