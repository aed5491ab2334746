"""``sterling serve``: the published model over HTTP (FastAPI + uvicorn, the ``[serve]`` extra).

Endpoints (OpenAPI at ``/docs`` and ``/openapi.json``):

- ``POST /v1/retrieve``: a user (``user_id`` from the user store and/or ``history`` of item ids,
  ``features``), ``filter``, ``k``, optional ``tasks`` and ``value`` (a named Value Model) →
  ids, scores, per-task scores, the snapshot version and the time per stage. The items of the
  user's history are never answered (``exclude_seen``, default true; false allows them), nor
  ``exclude_ids``; both are part of the filter, so ``k`` items still come back;
- ``POST /v1/rank``: a user and ``item_ids`` → per-task and value scores from the cached item state;
- ``POST /v1/items``: upsert (id, embedding, attributes) and delete items, live (bearer token); an
  upsert without an embedding is embedded by the model's item tower from its attributes;
- ``POST /v1/admin/reload``: swap in a snapshot (bearer token);
- ``POST /v1/admin/compact``: fold the update log into a new snapshot and swap to it (bearer token);
- ``GET /v1/snapshot``, ``GET /healthz``, ``GET /readyz``, ``GET /metrics`` (Prometheus).

Every malformed request is answered 4xx with a JSON body ``{"error": {"code", "message", ...}}``:
bad JSON, wrong types, unknown fields, NaN / inf, out-of-range ``k``, oversized bodies or lists,
unknown users, items, features, tasks or formulas, and filter syntax errors (with the position).
A POST body is read as JSON only under ``Content-Type: application/json`` (FastAPI's strict content
type: a page in a browser cannot send that cross-site without a CORS preflight); a body sent
without it (``curl -d`` alone sends form data) is a 422 that names the header.
An unexpected failure is a 500 with the same body, never a stack trace, and the server keeps going.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from sterling.index.filter import FilterError
from sterling.models.value_model import FormulaError
from sterling.serving.batcher import BatcherConfig, Overloaded
from sterling.serving.service import Limits, OutsideSnapshotRoot, ReloadInProgress, Service, Update
from sterling.serving.update_log import UpdateLog
from sterling.serving.users import UnknownUser
from sterling.snapshot import SnapshotError

__all__ = ["BackgroundServer", "ServerConfig", "create_app", "serve"]

log = logging.getLogger("sterling.serve")

Id = Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]
Int64 = Id  # an integer a 64-bit tensor holds (a larger one is a 422, not an overflow inside the server)
Number = StrictFloat | Int64
AttributeValue = StrictStr | StrictInt | StrictFloat | list[StrictStr | StrictInt]


@dataclass(frozen=True)
class ServerConfig:
    """How ``sterling serve`` runs.

    Args:
        snapshot (Path): the published snapshot to serve.
        token (str | None): the bearer token the write endpoints (items, admin) require.
        allow_no_auth (bool): run the write endpoints without a token (local use only); without
            it, a server with no token refuses to start.
        users (Path | None): a ``users.parquet`` for requests that name a user.
        value_formulas (tuple[tuple[str, str], ...]): named Value Model formulas (name, formula).
        batcher (BatcherConfig): micro-batching.
        limits (Limits): request size limits.
        freeze_gc (bool): freeze the GC's view of each loaded model (a server process of its own;
            :func:`serve` sets it).
        loader (Callable | None): loads a snapshot path as the served model (``Service``'s
            ``loader``; the Ray Serve ingress sets it).
        snapshot_root (Path | None): ``/v1/admin/reload`` loads only snapshots under it (default:
            the parent of ``snapshot``); any other path is one 403.
        update_log (Path | None): the SQLite update log (:mod:`sterling.serving.update_log`):
            ``/v1/items`` answers after its update is committed there, and a server started again
            serves the snapshot with its updates. None: a log in memory (live updates are gone
            with the process).
    """

    snapshot: Path
    token: str | None = None
    allow_no_auth: bool = False
    users: Path | None = None
    value_formulas: tuple[tuple[str, str], ...] = ()
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    limits: Limits = field(default_factory=Limits)
    freeze_gc: bool = False
    loader: Callable[[Path], Any] | None = None
    snapshot_root: Path | None = None
    update_log: Path | None = None

    def __post_init__(self) -> None:
        if not self.token and not self.allow_no_auth:
            raise ValueError(
                "the write endpoints (items, admin) need a bearer token: set STERLING_TOKEN "
                "(or --token-env NAME), or pass --insecure-no-auth for local use"
            )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class UserPart(_Strict):
    user_id: Id | None = Field(None, description="a user of the server's user store")
    history: list[Id] | None = Field(
        None,
        description="item ids the user interacted with, oldest first (after the stored history, if user_id is given)",
    )
    actions: list[StrictInt] | None = Field(None, description="action bitmask per history item (default 1)")
    features: dict[str, Int64 | StrictStr] = Field(default_factory=dict, description="context and user features")
    tasks: list[StrictStr] | None = Field(None, description="the tasks whose scores to return (default all)")
    value: StrictStr | None = Field(None, description="a named Value Model formula (default the snapshot's)")


class RetrieveRequest(UserPart):
    filter: StrictStr | None = Field(None, description="filter expression, e.g. 'genre:Drama AND year >= 1990'")
    k: StrictInt = Field(10, description="results wanted")
    exclude_seen: StrictBool = Field(
        True, description="leave out the items of the user's history (stored and sent); k still come back"
    )
    exclude_ids: list[Id] = Field(default_factory=list, description="item ids never to answer (e.g. already shown)")


class RankRequest(UserPart):
    item_ids: list[Id] = Field(description="the items to score")


class ItemIn(_Strict):
    id: Id
    embedding: list[Number] | None = Field(
        None,
        description="the item tower's embedding, D floats; left out, the served two-tower model's item "
        "tower embeds the item from its attributes (as publish embeds an item its checkpoint never saw)",
    )
    attributes: dict[str, AttributeValue] = Field(default_factory=dict)


class ItemsRequest(_Strict):
    upsert: list[ItemIn] = Field(default_factory=list)
    delete: list[Id] = Field(default_factory=list)


class ReloadRequest(_Strict):
    path: StrictStr | None = Field(None, description="the snapshot directory (default: the current one)")


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. a filter error's position, a validation's problems
    code: str = Field(description="a stable error code, e.g. bad_filter")
    message: str = Field(description="what is wrong, for people")


class ErrorBody(BaseModel):
    error: ErrorDetail


_STATUS_MEANS = {
    400: "bad input: a filter, formula, item, feature, task or limit (the message names it)",
    401: "a valid bearer token is required",
    403: "a path outside the snapshot root",
    404: "an unknown user",
    409: "a reload is already in progress",
    413: "the body is larger than the limit",
    422: "the body does not match the schema, or a snapshot is refused",
    500: "an unexpected error; the server logged it and keeps serving",
    503: "overloaded: the queue is full",
}


def _responses(*statuses: int) -> dict:
    """The OpenAPI ``responses`` of a route: each status with the JSON error body."""
    return {s: {"model": ErrorBody, "description": _STATUS_MEANS[s]} for s in (*statuses, 500)}


_QUERY_ERRORS = _responses(400, 404, 413, 422, 503)
_WRITE_ERRORS = _responses(400, 401, 413, 422, 503)


class BodyTooLarge(Exception):
    """A request body beyond ``Limits.max_body_bytes`` (also when sent without a Content-Length)."""


class _BodyLimit:
    """ASGI middleware counting the body bytes as they arrive: past the limit, reading the body
    fails before the rest is read, the app's answer is dropped and the client gets a 413."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        received, too_large = 0, False

        async def limited() -> dict:
            nonlocal received, too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                too_large = True
                raise BodyTooLarge(f"the body exceeds {self.limit} bytes")
            return message

        async def unless_too_large(message: dict) -> None:
            if not too_large:
                await send(message)

        try:
            await self.app(scope, limited, unless_too_large)
        except BodyTooLarge:
            pass
        if too_large:
            await _error(413, "too_large", f"the body exceeds {self.limit} bytes")(scope, receive, send)


#: What every POST endpoint takes (said by the errors about a body that is not JSON).
_JSON_BODY = "send a JSON object with the header Content-Type: application/json"


def _is_json(content_type: str | None) -> bool:
    """Whether a Content-Type is the one FastAPI reads a body as JSON under (application/json or
    application/*+json). Any other type, or none, leaves the body unparsed: a browser may send those
    cross-site without asking first, so the server does not read them as JSON either."""
    if not content_type:
        return False
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status)


#: Errors answered with their message: (exception class, HTTP status, error code). The most specific
#: class wins (FilterError and SnapshotError are ValueErrors).
_ERRORS = (
    (FormulaError, 400, "bad_formula"),
    (SnapshotError, 422, "snapshot_refused"),
    (ValueError, 400, "bad_request"),
    (Overloaded, 503, "overloaded"),
    (ReloadInProgress, 409, "conflict"),
    (OutsideSnapshotRoot, 403, "outside_snapshot_root"),
)


def _answer_with(status: int, code: str) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    async def handle(_: Request, e: Exception) -> JSONResponse:
        return _error(status, code, str(e))

    return handle


def _user(service: Service, req: UserPart, **asks: Any):
    return service.query(
        req.user_id,
        req.history,
        req.actions,
        req.features,
        tasks=None if req.tasks is None else tuple(req.tasks),
        value=req.value,
        **asks,
    )


def create_app(config: ServerConfig) -> FastAPI:
    """The FastAPI app serving ``config.snapshot`` (loaded, verified and warmed here)."""
    service = Service(
        config.snapshot,
        config.users,
        dict(config.value_formulas),
        config.batcher,
        config.limits,
        freeze_gc=config.freeze_gc,
        loader=config.loader,
        snapshot_root=config.snapshot_root,
        update_log=UpdateLog(config.update_log),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()
        service.update_log.close()

    app = FastAPI(
        title="sterling", version="1", description="Index-as-model retrieval: one served model.", lifespan=lifespan
    )
    app.state.service = service
    bearer = HTTPBearer(auto_error=False)

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if config.token is None:
            return
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), config.token.encode()):
            raise StarletteHTTPException(401, "a valid bearer token is required")

    app.add_middleware(_BodyLimit, limit=config.limits.max_body_bytes)
    paths: set[str] = set()  # the routes' paths, metric labels (filled once the routes are declared)

    @app.middleware("http")
    async def account(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        endpoint, start = request.url.path, time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 - the last line of defence: answer, log, keep serving
            log.exception("unexpected error on %s", endpoint)
            response = _error(500, "internal", "an unexpected error; the server logged it and keeps serving")
        known = endpoint if endpoint in paths else "other"
        service.metrics.requests.labels(endpoint=known, status=str(response.status_code)).inc()
        service.metrics.latency.labels(endpoint=known).observe(time.perf_counter() - start)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        problems = [
            {"where": ".".join(str(p) for p in err.get("loc", ())), "problem": err.get("msg", "")} for err in errors
        ]
        first = problems[0] if problems else {"where": "body", "problem": "invalid"}
        message = f"{first['where']}: {first['problem']}"
        content_type = request.headers.get("content-type")
        if request.method == "POST" and not _is_json(content_type):
            # the body was not read as JSON at all (curl -d without -H sends form data): say why
            got = f"Content-Type: {content_type}" if content_type else "no Content-Type"
            message = f"the body was not read as JSON: {_JSON_BODY} (got {got})"
        elif errors and errors[0].get("type") == "json_invalid":
            why = (errors[0].get("ctx") or {}).get("error", "")
            message = f"{first['where']}: the body is not valid JSON ({why}): {_JSON_BODY}"
        return _error(422, "invalid_request", message, problems=problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        response = _error(
            e.status_code,
            {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error"),
            str(e.detail),
        )
        response.headers.update(e.headers or {})  # 405's Allow (RFC 9110)
        if e.status_code == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(FilterError)
    async def bad_filter(_: Request, e: FilterError) -> JSONResponse:
        return _error(400, "bad_filter", f"{e.problem} at position {e.position}", position=e.position, filter=e.expr)

    @app.exception_handler(UnknownUser)
    async def unknown_user(_: Request, e: UnknownUser) -> JSONResponse:
        return _error(404, "unknown_user", f"user {e.args[0]} is not in the user store")

    @app.exception_handler(LookupError)
    async def missing(_: Request, e: LookupError) -> JSONResponse:
        return _error(400, "bad_request", str(e.args[0]) if e.args else "not found")

    for error, status, code in _ERRORS:
        app.add_exception_handler(error, _answer_with(status, code))

    @app.post("/v1/retrieve", summary="Top-k items for a user under a filter", responses=_QUERY_ERRORS)
    async def retrieve(req: RetrieveRequest) -> dict:
        start = time.perf_counter()
        asks = {
            "filter": req.filter,
            "k": req.k,
            "exclude_seen": req.exclude_seen,
            "exclude_ids": list(req.exclude_ids),
        }
        out = await service.retrieve(_user(service, req, **asks))
        out["timing_ms"]["total"] = 1e3 * (time.perf_counter() - start)
        return out

    @app.post("/v1/rank", summary="Per-task and value scores of given items for a user", responses=_QUERY_ERRORS)
    async def rank(req: RankRequest) -> dict:
        return await service.rank(_user(service, req, items=list(req.item_ids)))

    @app.post(
        "/v1/items",
        summary="Upsert and delete items, live",
        dependencies=[Depends(authorized)],
        responses=_WRITE_ERRORS,
    )
    async def items(req: ItemsRequest) -> dict:
        upserts = req.upsert
        update = Update.of(
            [i.id for i in upserts], [i.embedding for i in upserts], [dict(i.attributes) for i in upserts], req.delete
        )
        return await service.update(update)

    @app.post(
        "/v1/admin/reload",
        summary="Swap in a snapshot (verified and warmed first)",
        dependencies=[Depends(authorized)],
        responses=_responses(400, 401, 403, 409, 413, 422),
    )
    async def reload(req: ReloadRequest | None = None) -> dict:
        info = await service.reload(None if req is None or req.path is None else Path(req.path))
        return {"path": info.path, "version": info.version, "created_at": info.created_at}

    @app.post(
        "/v1/admin/compact",
        summary="Fold the update log into a new snapshot under the snapshot root, and swap to it",
        dependencies=[Depends(authorized)],
        responses=_responses(400, 401, 409, 413, 422),
    )
    async def compact() -> dict:
        return await service.compact()

    @app.get("/v1/snapshot", summary="The snapshot served", responses=_responses())
    async def snapshot() -> dict:
        return service.describe()

    @app.get("/healthz", summary="The process is up", responses=_responses())
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="A model is loaded and warm, and its thread answers",
        responses={503: {"description": "not ready: the model thread does not answer"}, **_responses()},
    )
    async def readyz() -> JSONResponse:
        ready = service.batcher.alive
        return JSONResponse({"ready": ready, "version": service.info.version}, status_code=200 if ready else 503)

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {}}}, **_responses()},
    )
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    paths.update(route.path for route in app.routes)
    return app


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Bind ``host:port`` (a busy port is one ValueError, before the model loads), load the model,
    say on stderr that it serves, and serve until interrupted."""
    import uvicorn

    sock = bind(host, port)
    try:
        app = create_app(replace(config, freeze_gc=True))
    except BaseException:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    print(f"sterling: serving {config.snapshot} on http://{host}:{bound} (docs at /docs)", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port`` (port 0: a free one): connections wait in its
    backlog until uvicorn accepts them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


class BackgroundServer:
    """The server on a thread of this process, on ``host`` and a free port (tests, notebooks)::

    with BackgroundServer(ServerConfig(snapshot, token="t")) as server:
        urllib.request.urlopen(server.url + "/healthz")
    """

    def __init__(self, config: ServerConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.app = create_app(config)
        self._server = uvicorn.Server(
            uvicorn.Config(self.app, host=host, port=port, log_level="warning", access_log=False)
        )
        self._thread = threading.Thread(target=self._server.run, name="sterling-server", daemon=True)
        self.host = host
        self.port = port

    @property
    def service(self) -> Service:
        return self.app.state.service

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join()
