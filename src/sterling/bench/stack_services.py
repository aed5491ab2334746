"""The services of the conventional stack of ``sterling bench stack``, each a process of its own
(``python -m sterling.bench.stack_services --role ROLE --snapshot SNAP --port PORT``), over HTTP
(aiohttp) on 127.0.0.1, in the wire format of :mod:`sterling.bench.stack_wire`:

* ``filter`` — the exact attribute index: sterling's exact attribute store of the snapshot's items
  (the columns the index's exact check reads) evaluates each filter to its passing rows, remembered
  per filter string (as sterling's index remembers a filter's passing rows).
  ``POST /v1/filter {"filters": [str | null, ...]}`` → ``{"results": [...]}``: per filter ``null``
  (no filter), ``{"count", "bitmap"}`` (packed bits, little bit order: FAISS's
  ``IDSelectorBitmap``) or ``{"count", "rows"}`` (int32 rows, when smaller), or ``{"error"}``.
* ``ann`` — FAISS ``IndexIVFScalarQuantizer`` (SQ8, inner product, ``nlist`` lists: sterling's) over
  the items' vectors, ids = index rows. ``POST /v1/search {"k", "nprobe", "requests": [{"queries":
  float32 [T, D], "allowed": a filter result | null, "exclude": int64 rows | null}]}`` →
  ``{"rows": int64 [R, T, k]}`` (-1 past the passing items): one FAISS search per request, its
  ``T`` queries together, under an ``IDSelectorBitmap`` of the passing rows minus the excluded ones.
* ``ranking`` — the snapshot's OverArch and Value Model over its own copy of the item cache.
  ``POST /v1/rank {"histories", "users": float32 [B, D], "queries": float32 [B, T, D], "rows": int64
  [B, T, K0], "k": [B ints]}`` → ``{"ids", "scores"}``: the whole batch in one pass
  (:meth:`~sterling.retrieval.model.RetrievalModel.rank_candidates`), exactly as sterling ranks.
* ``front`` — :mod:`sterling.bench.stack_front`.

Each service runs its work on one worker thread beside its event loop (requests queue there), with
``--threads`` torch / OpenMP threads (default: torch's).
"""

from __future__ import annotations

import argparse
import asyncio
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from sterling.bench.stack_wire import BadInput, Pieces, error_body, field, make_app, pack, unpack

__all__ = ["AnnService", "FilterService", "RankingService", "main"]

ROLES = ("front", "filter", "ann", "ranking")


class _Worker:
    """One worker thread beside the event loop."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(1)

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)


class FilterService(_Worker):
    """Filter strings → passing rows (exact), remembered per string (``remember`` at most)."""

    def __init__(self, pieces: Pieces, remember: int = 4096) -> None:
        super().__init__()
        self.store = pieces.index._state.main.attributes  # the exact attribute store, by index row
        self.n = len(pieces.ids)
        self.remember = remember
        self.known: OrderedDict[str, dict] = OrderedDict()

    def passing(self, expr: object) -> dict | None:
        if expr is None:
            return None
        if not isinstance(expr, str):
            return error_body("bad_filter", f"a filter is a string or null, got {type(expr).__name__}")
        if expr in self.known:
            self.known.move_to_end(expr)
            return self.known[expr]
        try:
            mask = self.store.evaluate_filter(expr).numpy()
        except ValueError as e:  # FilterError: malformed, or an unknown feature
            return error_body("bad_filter", str(e))
        rows = np.flatnonzero(mask)
        if 4 * len(rows) < (self.n + 7) // 8:
            out = {"count": len(rows), "rows": pack(rows.astype(np.int32))}
        else:
            out = {"count": len(rows), "bitmap": pack(np.packbits(mask, bitorder="little"))}
        self.known[expr] = out
        if len(self.known) > self.remember:
            self.known.popitem(last=False)
        return out

    async def handle(self, body: dict) -> dict:
        filters = field(body, "filters", list)
        return {"results": await self.run(lambda: [self.passing(f) for f in filters])}


class AnnService(_Worker):
    """FAISS IVF-SQ8 over ``vectors`` float32 ``[N, D]`` (ids: rows), ``nlist`` lists."""

    def __init__(self, vectors: np.ndarray, nlist: int, nprobe: int = 1, threads: int | None = None) -> None:
        import faiss

        super().__init__()
        if threads:
            faiss.omp_set_num_threads(threads)
        self.faiss = faiss
        n, d = vectors.shape
        self.n, self.dim, self.nlist, self.nprobe = n, d, nlist, nprobe
        quantizer = faiss.IndexFlatIP(d)
        self.index = faiss.IndexIVFScalarQuantizer(
            quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
        self.index.train(vectors)
        self.index.add(vectors)
        self.quantizer = quantizer  # the IVF index does not own it

    def bitmap(self, allowed: dict | None, exclude: np.ndarray | None) -> np.ndarray | None:
        """uint8 ``[ceil(N / 8)]``: the passing rows (all if ``allowed`` is None) less ``exclude``."""
        if allowed is None and exclude is None:
            return None
        size = (self.n + 7) // 8
        if allowed is None:
            bits = np.full(size, 255, dtype=np.uint8)
        elif not isinstance(allowed, dict) or len({"bitmap", "rows"} & set(allowed)) != 1:
            raise BadInput("allowed: a filter result ({'count', 'bitmap' | 'rows'}) or null")
        elif "bitmap" in allowed:
            bits = unpack(allowed["bitmap"], "uint8", 1, "allowed.bitmap")
            if len(bits) != size:
                raise BadInput(f"allowed.bitmap: {size} bytes for {self.n} items, got {len(bits)}")
        else:
            bits = np.zeros(size, dtype=np.uint8)
            self._set(bits, unpack(allowed["rows"], "int32", 1, "allowed.rows").astype(np.int64), True)
        if exclude is not None:
            self._set(bits, exclude, False)
        return bits

    def _set(self, bits: np.ndarray, rows: np.ndarray, on: bool) -> None:
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n):
            raise BadInput(f"rows must lie in [0, {self.n})")
        masks = (1 << (rows & 7)).astype(np.uint8)
        if on:
            np.bitwise_or.at(bits, rows >> 3, masks)
        else:
            np.bitwise_and.at(bits, rows >> 3, ~masks)

    def search(self, requests: list, k: int, nprobe: int) -> np.ndarray:
        faiss = self.faiss
        parsed = []
        for r in requests:  # every request checked before any search
            if not isinstance(r, dict):
                raise BadInput("requests: a list of objects")
            q = unpack(field(r, "queries", dict), "float32", 2, "queries")
            if q.shape[1] != self.dim or (parsed and q.shape[0] != parsed[0][0].shape[0]):
                raise BadInput(f"queries: [T, {self.dim}] with the same T in every request, got {list(q.shape)}")
            exclude = r.get("exclude")
            exclude = None if exclude is None else unpack(exclude, "int64", 1, "exclude")
            parsed.append((q, self.bitmap(r.get("allowed"), exclude)))
        t = parsed[0][0].shape[0] if parsed else 0
        out = np.full((len(parsed), t, k), -1, dtype=np.int64)
        for i, (q, bits) in enumerate(parsed):
            params = faiss.SearchParametersIVF(nprobe=nprobe)
            if bits is not None:
                params.sel = faiss.IDSelectorBitmap(self.n, faiss.swig_ptr(bits))
            _, rows = self.index.search(q, k, params=params)
            out[i] = rows
        return out

    async def handle(self, body: dict) -> dict:
        k = field(body, "k", int)
        nprobe = body.get("nprobe", self.nprobe)
        if not 1 <= k <= self.n:
            raise BadInput(f"k must lie in [1, {self.n}], got {k}")
        if not isinstance(nprobe, int) or isinstance(nprobe, bool) or not 1 <= nprobe <= self.nlist:
            raise BadInput(f"nprobe must be an int in [1, {self.nlist}], got {nprobe!r}")
        requests = field(body, "requests", list)
        return {"rows": pack(await self.run(self.search, requests, k, nprobe))}


class RankingService(_Worker):
    """OverArch + Value Model over candidate rows, with the snapshot's item cache."""

    def __init__(self, pieces: Pieces) -> None:
        super().__init__()
        self.pieces = pieces
        self.ids = torch.from_numpy(pieces.ids)

    def rank(self, body: dict) -> dict:
        p, model = self.pieces, self.pieces.model
        histories = field(body, "histories", list)
        ks = field(body, "k", list)
        b = len(histories)
        users = unpack(field(body, "users", dict), "float32", 2, "users")
        queries = unpack(field(body, "queries", dict), "float32", 3, "queries")
        rows = unpack(field(body, "rows", dict), "int64", 3, "rows")
        t = len(model.config.query_tasks)
        if users.shape != (b, p.dim) or queries.shape != (b, t, p.dim) or rows.shape[:2] != (b, t):
            raise BadInput(
                f"{b} histories need users [{b}, {p.dim}], queries [{b}, {t}, {p.dim}] and rows [{b}, {t}, K0]"
            )
        if len(ks) != b or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
            raise BadInput(f"k: {b} positive ints")
        if rows.size and (rows.min() < -1 or rows.max() >= len(p.ids)):
            raise BadInput(f"rows must lie in [-1, {len(p.ids)})")
        if b == 0:
            return {"ids": [], "scores": []}
        inputs = p.inputs(histories)
        rows_t = torch.from_numpy(rows)
        found = rows_t >= 0
        ids = torch.where(found, self.ids[rows_t.clamp(min=0)], -1)
        state = p.cache[rows_t.clamp(min=0)].float() * found[..., None]  # 0 where a slot is empty
        with torch.no_grad():
            answer = model.rank_candidates(
                inputs, torch.from_numpy(users), torch.from_numpy(queries), ids, state, max(ks)
            )
        out_ids, out_scores = [], []
        for i, k in enumerate(ks):
            got = answer.ids[i, :k]
            n = int((got >= 0).sum())
            out_ids.append(got[:n].tolist())
            out_scores.append(answer.scores[i, :n].tolist())
        return {"ids": out_ids, "scores": out_scores}

    async def handle(self, body: dict) -> dict:
        return await self.run(self.rank, body)


def routes(role: str, args: argparse.Namespace) -> dict:
    """The POST routes of ``role``'s service, its state built from the snapshot."""
    if role == "filter":
        return {"/v1/filter": FilterService(Pieces.load(args.snapshot, keep_index=True)).handle}
    if role == "ann":
        pieces = Pieces.load(args.snapshot)
        vectors = pieces.vectors()
        del pieces
        return {"/v1/search": AnnService(vectors, args.nlist, args.nprobe, args.threads).handle}
    if role == "ranking":
        return {"/v1/rank": RankingService(Pieces.load(args.snapshot)).handle}
    from sterling.bench.stack_front import Front

    front = Front(Pieces.load(args.snapshot), args)
    return {"/v1/retrieve": front.handle}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sterling.bench.stack_services")
    p.add_argument("--role", choices=ROLES, required=True)
    p.add_argument("--snapshot", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, help="torch and OpenMP threads (default torch's)")
    p.add_argument("--nlist", type=int, default=0, help="ann: IVF lists")
    p.add_argument("--nprobe", type=int, default=1, help="ann: default lists probed; front: the lists it asks for")
    p.add_argument("--max-batch", type=int, default=8, help="front: most requests per user-tower batch")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="front: longest wait to fill a batch")
    p.add_argument("--filter-url", help="front: the filtering service")
    p.add_argument("--ann-url", help="front: the ANN service")
    p.add_argument("--ranking-url", help="front: the ranking service")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from aiohttp import web

    app = make_app(routes(args.role, args))
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
