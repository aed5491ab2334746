"""What the services of the conventional stack (``sterling bench stack``) share: the wire format of
arrays, the JSON error answer, an aiohttp application with ``/readyz``, and the pieces of the
served snapshot a service keeps.

**Wire format.** Bodies are JSON; an array travels as ``{"dtype", "shape", "b64"}``: the base64 of
its little-endian bytes (:func:`pack`, :func:`unpack`). Query vectors (float32 ``[T, D]``), candidate
rows (int64 ``[B, T, K0]``) and filter results (a packed bitmap, uint8 ``[ceil(N / 8)]``, or the
passing rows, int32 ``[M]``, whichever is smaller) cost 4/3 of their bytes plus a few dozen, where a
JSON list of numbers costs 2-3x more and is slower to parse; ids a client sends (histories) stay JSON
lists, as in sterling's own API.

**Errors.** Bad input (malformed JSON, a missing or mistyped field, a bad shape, an unknown item id or
filter feature) answers 400 with ``{"error": {"code", "message"}}``, like ``sterling serve``; an
unknown path answers 404, a wrong method 405, in the same shape.

**The snapshot's pieces** (:class:`Pieces`): every service reads the same snapshot and keeps only what
its job needs, the index dropped unless asked for: the item ids by index row, the item cache (the
user tower reads the history's embeddings there, ranking reads the candidates' item state) and the
model's modules (user tower, task queries, OverArch, Value Model).
"""

from __future__ import annotations

import base64
import functools
import gc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from sterling.retrieval.inputs import UserInputs, parse_inputs

__all__ = ["BadInput", "Pieces", "error_body", "make_app", "pack", "unpack"]

_DTYPES = ("float32", "int64", "int32", "uint8")
#: Largest request body a service reads (a front batch's candidate rows stay far below it).
MAX_BODY = 64 * 2**20


class BadInput(ValueError):
    """Input a service refuses with a 400."""


def pack(a: np.ndarray) -> dict:
    """The wire form of an array (one of float32, int64, int32, uint8)."""
    a = np.ascontiguousarray(a)
    if str(a.dtype) not in _DTYPES:
        raise ValueError(f"cannot send {a.dtype}: one of {_DTYPES}")
    raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
    return {"dtype": str(a.dtype), "shape": list(a.shape), "b64": base64.b64encode(raw).decode()}


def unpack(obj: object, dtype: str, ndim: int | None = None, name: str = "array") -> np.ndarray:
    """The array of a wire form (a writable copy); BadInput unless it is one of ``dtype`` and
    ``ndim`` dimensions whose bytes match its shape."""
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "b64"}:
        raise BadInput(f"{name}: an array is {{'dtype', 'shape', 'b64'}}, got {_short(obj)}")
    shape = obj["shape"]
    if obj["dtype"] != dtype:
        raise BadInput(f"{name}: dtype must be {dtype}, got {_short(obj['dtype'])}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise BadInput(f"{name}: shape must be a list of non-negative ints, got {_short(shape)}")
    if ndim is not None and len(shape) != ndim:
        raise BadInput(f"{name}: {ndim} dimensions expected, got shape {shape}")
    try:
        raw = base64.b64decode(obj["b64"], validate=True)
    except (TypeError, ValueError) as e:
        raise BadInput(f"{name}: b64 is not base64 ({e})") from None
    a = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
    if a.size != int(np.prod(shape)):
        raise BadInput(f"{name}: {a.size} values for the shape {shape}")
    out = a.reshape(shape).astype(dtype)
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        raise BadInput(f"{name}: values must be finite")
    return out


def _short(obj: object) -> str:
    text = repr(obj)
    return text if len(text) <= 60 else text[:57] + "..."


class UpstreamError(RuntimeError):
    """A service this one calls failed or could not be reached: answered 502."""


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def make_app(routes: dict[str, Callable[[dict], Awaitable[dict]]]):
    """An aiohttp application: ``GET /readyz`` and a ``POST`` route per path, each handler given the
    JSON body (a dict) and answering a dict; bad input answers a 400 JSON error, an
    :class:`UpstreamError` a 502 one."""
    from aiohttp import web

    @web.middleware
    async def errors(request, handler):
        try:
            return await handler(request)
        except web.HTTPException as e:  # 404, 405, 413: the same JSON shape
            codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
            return web.json_response(error_body(codes.get(e.status, "http_error"), e.reason), status=e.status)
        except (ValueError, TypeError, KeyError, IndexError) as e:  # BadInput, FilterError, a bad JSON body
            return web.json_response(error_body("bad_request", str(e) or type(e).__name__), status=400)
        except UpstreamError as e:
            return web.json_response(error_body("upstream_error", str(e)), status=502)

    def post(fn):
        async def handle(request):
            body = await request.json()  # a JSONDecodeError (ValueError): 400
            if not isinstance(body, dict):
                raise BadInput(f"the body must be a JSON object, got {type(body).__name__}")
            return web.json_response(await fn(body))

        return handle

    async def ready(_request):
        return web.json_response({"ready": True})

    app = web.Application(middlewares=[errors], client_max_size=MAX_BODY)
    app.router.add_get("/readyz", ready)
    for path, fn in routes.items():
        app.router.add_post(path, post(fn))
    return app


def field(body: dict, name: str, kind: type | tuple[type, ...]) -> object:
    """``body[name]``, which must be of ``kind`` (BadInput otherwise; bool is no int)."""
    if name not in body:
        raise BadInput(f"missing field {name!r}")
    value = body[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        raise BadInput(f"{name}: expected {_names(kind)}, got {type(value).__name__}")
    return value


def _kinds(kind) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _names(kind) -> str:
    return " or ".join(k.__name__ for k in _kinds(kind))


@dataclass
class Pieces:
    """What a service keeps of the served model (see the module doc).

    Attributes:
        model: the :class:`~sterling.retrieval.model.RetrievalModel`, its index (and item table
            view) dropped unless ``keep_index``: its modules rank through ``rank_candidates``.
        ids: int64 ``[N]``, the external id of each index row.
        cache: ``[N, S]`` (float16), the item cache by index row.
        index: the :class:`~sterling.index.item_index.ItemIndex` when kept, else None.
    """

    model: object
    ids: np.ndarray
    cache: torch.Tensor
    index: object = None

    def __post_init__(self) -> None:
        self._order = np.argsort(self.ids, kind="stable")
        self._sorted = self.ids[self._order]

    @classmethod
    def load(cls, snapshot: str | Path, keep_index: bool = False) -> Pieces:
        from sterling.retrieval.publish import load_model

        model = load_model(Path(snapshot))
        index = model.index
        if index.fresh_items:
            raise ValueError("the stack bench serves a compacted snapshot (no fresh items)")
        cache = index._state.table  # the compacted index's item table (no copy)
        ids = index.ids.numpy().copy()
        if not keep_index:
            model.index, model.items, index = None, None, None
            gc.collect()
        return cls(model, ids, cache, index)

    @property
    def dim(self) -> int:
        return self.model.user_tower.cfg.dim

    def rows_of(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """int64: the index row of each external id; BadInput names unknown ones."""
        ids = np.asarray(ids, dtype=np.int64)
        at = np.searchsorted(self._sorted, ids).clip(max=len(self._sorted) - 1)
        found = self._sorted[at] == ids
        if not found.all():
            raise BadInput(f"unknown item ids {np.unique(ids[~found])[:10].tolist()} (not in the catalogue)")
        return self._order[at]

    def vectors(self) -> np.ndarray:
        """float32 ``[N, D]``: the items' index vectors from the cached embeddings (the ANN service's
        and the exact answer's: the same numbers the user tower and the index were built from)."""
        with torch.no_grad():
            return self.model.user_tower.index_vectors(self.cache[:, : self.dim].float()).numpy()

    @functools.cached_property
    def float_vectors(self) -> torch.Tensor:
        """:meth:`vectors` as a tensor, kept."""
        return torch.from_numpy(self.vectors())

    def inputs(self, histories: list) -> UserInputs:
        """The :class:`UserInputs` of ``B`` histories (lists of external ids), their cached embeddings
        read from this copy of the cache."""
        if not isinstance(histories, list) or not all(
            isinstance(h, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in h) for h in histories
        ):
            raise BadInput("histories must be lists of item ids (ints)")
        ids, inputs = parse_inputs(self.model.config, histories)
        rows = torch.from_numpy(self.rows_of(ids.numpy()))
        return replace(inputs, history_rows=rows, history_vectors=self.cache[rows, : self.dim].float())
