"""The front service of the conventional stack (``sterling bench stack``): sterling's request API
(``POST /v1/retrieve {"history", "filter", "k", "exclude_seen"}`` → ``{"ids", "scores",
"timing_ms"}``) in front of the filtering, ANN and ranking services
(:mod:`sterling.bench.stack_services`).

**Batching.** Requests are checked one by one (unknown history ids, a bad ``k``: 400 at once), then
queue for the user tower: a batch is the first waiting request and whatever arrives within
``max_wait_ms``, up to ``max_batch`` (sterling's micro-batcher's settings). The user tower runs one
batch at a time on a worker thread; each batch then goes down the chain on its own — one filter call
(its distinct filters), one ANN call (its requests' task queries, ``k = K0``, the front's
``nprobe``), one ranking call — while the next batch is encoded. A request whose filter the filtering
service refuses answers 400 (``bad_filter``); the rest of its batch goes on.

``timing_ms`` per answer: ``queue`` (arrival to its batch's start), ``user_tower``, ``filter``,
``ann``, ``ranking`` (the calls' round trips, the whole batch's), ``total`` and ``batch_size``.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from sterling.bench.stack_wire import BadInput, Pieces, UpstreamError, pack, unpack

__all__ = ["Front"]


@dataclass
class _Request:
    history: list[int]
    filter: str | None
    k: int
    exclude: np.ndarray | None  # int64 rows never to answer (the history's), or None
    arrived: float
    future: asyncio.Future


class Front:
    """The front service's state: the user tower, the batch queue and the clients of the others."""

    def __init__(self, pieces: Pieces, args) -> None:
        self.pieces = pieces
        self.k0 = pieces.model.config.k0
        self.nprobe = args.nprobe
        self.urls = {"filter": args.filter_url, "ann": args.ann_url, "ranking": args.ranking_url}
        missing = [name for name, url in self.urls.items() if not url]
        if missing:
            raise SystemExit(f"the front service needs --{'-url, --'.join(missing)}-url")
        self.max_batch, self.max_wait = args.max_batch, args.max_wait_ms / 1e3
        self.pool = ThreadPoolExecutor(1)
        self.queue: asyncio.Queue | None = None
        self.session = None

    def check(self, body: dict, loop: asyncio.AbstractEventLoop) -> _Request:
        history = body.get("history", [])
        flt, k, exclude_seen = body.get("filter"), body.get("k", 10), body.get("exclude_seen", True)
        unknown = set(body) - {"history", "filter", "k", "exclude_seen"}
        if unknown:
            raise BadInput(f"unknown fields {sorted(unknown)}")
        if not isinstance(history, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in history):
            raise BadInput("history: a list of item ids (ints)")
        if flt is not None and not isinstance(flt, str):
            raise BadInput("filter: a string or null")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.k0:
            raise BadInput(f"k must be an int in [1, {self.k0}], got {k!r}")
        if not isinstance(exclude_seen, bool):
            raise BadInput("exclude_seen: a bool")
        rows = self.pieces.rows_of(history)  # unknown ids: 400
        exclude = np.unique(rows) if exclude_seen and len(rows) else None
        return _Request(history, flt, k, exclude, loop.time(), loop.create_future())

    async def handle(self, body: dict) -> dict:
        loop = asyncio.get_running_loop()
        if self.queue is None:
            import aiohttp

            self.queue = asyncio.Queue()
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64), timeout=aiohttp.ClientTimeout(total=60)
            )
            loop.create_task(self._batcher())
        request = self.check(body, loop)
        await self.queue.put(request)
        return await request.future

    def _encode(self, batch: list[_Request]) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            users, queries = self.pieces.model.encode(self.pieces.inputs([r.history for r in batch]))
        return users.numpy(), queries.numpy()

    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                wait = deadline - loop.time()
                if wait <= 0 and self.queue.empty():
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), max(wait, 0.0)))
                except asyncio.TimeoutError:
                    break
            start = loop.time()
            try:
                users, queries = await loop.run_in_executor(self.pool, self._encode, batch)
            except Exception as e:  # noqa: BLE001 - the batch's answers carry it
                _fail(batch, e)
                continue
            times = {"user_tower": loop.time() - start}
            loop.create_task(self._chain(batch, users, queries, start, times))

    async def _post(self, name: str, path: str, body: dict) -> dict:
        from aiohttp import ClientError

        try:
            async with self.session.post(self.urls[name] + path, json=body) as r:
                answer = await r.json(content_type=None)
        except (ClientError, ValueError) as e:  # refused, reset, not JSON
            raise UpstreamError(f"the {name} service at {self.urls[name]} failed: {e or type(e).__name__}") from e
        if r.status != 200:
            raise UpstreamError(f"the {name} service answered {r.status}: {answer}")
        return answer

    async def _chain(self, batch: list[_Request], users, queries, start: float, times: dict) -> None:
        loop = asyncio.get_running_loop()
        try:
            t = loop.time()
            filters = list(dict.fromkeys(r.filter for r in batch if r.filter is not None))
            results = (await self._post("filter", "/v1/filter", {"filters": filters}))["results"] if filters else []
            allowed = dict(zip(filters, results))
            times["filter"] = loop.time() - t
            keep = []
            for i, r in enumerate(batch):
                result = allowed.get(r.filter)
                if result is not None and "error" in result:
                    r.future.set_exception(BadInput(result["error"]["message"]))
                else:
                    keep.append(i)
            if not keep:
                return
            t = loop.time()
            requests = [
                {
                    "queries": pack(queries[i]),
                    "allowed": allowed.get(batch[i].filter),
                    "exclude": None if batch[i].exclude is None else pack(batch[i].exclude),
                }
                for i in keep
            ]
            body = {"k": self.k0, "nprobe": self.nprobe, "requests": requests}
            rows = unpack((await self._post("ann", "/v1/search", body))["rows"], "int64", 3, "rows")
            times["ann"] = loop.time() - t
            t = loop.time()
            body = {
                "histories": [batch[i].history for i in keep],
                "users": pack(users[keep]),
                "queries": pack(queries[keep]),
                "rows": pack(rows),
                "k": [batch[i].k for i in keep],
            }
            ranked = await self._post("ranking", "/v1/rank", body)
            times["ranking"] = loop.time() - t
            done = loop.time()
            for j, i in enumerate(keep):
                r = batch[i]
                timing = {"queue": start - r.arrived, **times, "total": done - r.arrived}
                timing_ms = {name: 1e3 * s for name, s in timing.items()}
                answer = {"ids": ranked["ids"][j], "scores": ranked["scores"][j], "timing_ms": timing_ms}
                answer["timing_ms"]["batch_size"] = len(batch)
                r.future.set_result(answer)
        except Exception as e:  # noqa: BLE001 - the batch's answers carry it
            _fail(batch, e)


def _fail(batch: list[_Request], error: Exception) -> None:
    for r in batch:
        if not r.future.done():
            r.future.set_exception(error)
