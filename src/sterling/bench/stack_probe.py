"""The answers ``sterling bench stack`` measures both stacks against, and FAISS's nprobe tuning.

* :func:`exact_answers`: the same model's exact answer to a request: per task query the exact
  filtered top-K0 by inner product with the float item vectors (brute force; the history's items
  excluded, as both stacks exclude them), then the model's OverArch and Value Model over those
  candidates (:meth:`~sterling.retrieval.model.RetrievalModel.rank_candidates`), top-k.
* :func:`recall_at_k`: the share of the exact answers' ids a stack's answers hold.
* :func:`tune_nprobe`: recall@K0 of the task queries under their filters (no exclusion) against the
  exact filtered top-K0: sterling's index at its ``nprobe``, and the ANN service's FAISS index at
  rising ``nprobe`` (1, 2, 4, ..., ``nlist``) until it reaches sterling's, then bisected between
  the last power of two that falls short and the first that reaches it: the smallest such
  ``nprobe`` (recall rises with ``nprobe``).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable

import torch

from sterling.bench.stack_wire import Pieces, pack, unpack

__all__ = ["exact_answers", "recall_at_k", "smallest_reaching", "tune_nprobe"]


def _exact_rows(pieces: Pieces, queries: torch.Tensor, flt: str | None, exclude: list[int], k0: int) -> torch.Tensor:
    """int64 ``[T, K0]``: the exact filtered top-K0 rows of ``queries [T, D]`` (-1 past the passing items)."""
    vectors = pieces.float_vectors
    n = vectors.shape[0]
    if flt is None:
        mask = torch.ones(n, dtype=torch.bool)
    else:
        mask = pieces.index._state.main.attributes.evaluate_filter(flt).clone()
    if exclude:
        mask[torch.from_numpy(pieces.rows_of(exclude))] = False
    scores = (queries @ vectors.T).masked_fill(~mask, float("-inf"))  # [T, N]
    top = scores.topk(min(k0, n), dim=1)
    rows = torch.where(top.values > float("-inf"), top.indices, -1)
    return torch.cat([rows, rows.new_full((rows.shape[0], k0 - rows.shape[1]), -1)], 1)


@torch.no_grad()
def exact_answers(pieces: Pieces, mix: list[dict]) -> list[list[int]]:
    """The exact answer (ids, best first) of each request of ``mix`` (see the module doc)."""
    model, k0 = pieces.model, pieces.model.config.k0
    ids_of = torch.from_numpy(pieces.ids)
    out = []
    for r in mix:
        inputs = pieces.inputs([r["history"]])
        users, queries = model.encode(inputs)  # [1, D], [1, T, D]
        exclude = r["history"] if r.get("exclude_seen", True) else []
        rows = _exact_rows(pieces, queries[0], r["filter"], exclude, k0)  # [T, K0]
        found = rows >= 0
        ids = torch.where(found, ids_of[rows.clamp(min=0)], -1)
        state = pieces.cache[rows.clamp(min=0)].float() * found[..., None]
        answer = model.rank_candidates(inputs, users, queries, ids[None], state[None], r["k"])
        out.append([i for i in answer.ids[0].tolist() if i >= 0])
    return out


def recall_at_k(got: list[list[int]], exact: list[list[int]]) -> float:
    """Of all ids of the exact answers, the share the answers ``got`` hold (request by request)."""
    hits = sum(len(set(g) & set(e)) for g, e in zip(got, exact))
    return hits / max(sum(map(len, exact)), 1)


def _post(url: str, body: dict) -> dict:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as r:
        return json.loads(r.read())


def _recall(found: list[set[int]], exact: list[set[int]]) -> float:
    return sum(len(f & e) for f, e in zip(found, exact)) / max(sum(map(len, exact)), 1)


def smallest_reaching(reaches: Callable[[int], bool], nlist: int) -> int:
    """The smallest ``nprobe`` in ``1 … nlist`` for which ``reaches`` holds, assuming it holds
    from some point on (recall rises with ``nprobe``): doubling from 1, then bisecting between
    the last power of two that falls short and the first that reaches; ``nlist`` when none does.
    Calls ``reaches`` about ``2 log2(answer)`` times."""
    lo, hi = 0, 1  # lo falls short (0: none tried), hi is the next try
    reached = reaches(hi)
    while not reached and hi < nlist:
        lo, hi = hi, min(2 * hi, nlist)
        reached = reaches(hi)
    while reached and hi - lo > 1:  # bisect: lo falls short, hi reaches
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    return hi


@torch.no_grad()
def tune_nprobe(pieces: Pieces, mix: list[dict], filter_url: str, ann_url: str, nlist: int) -> dict:
    """FAISS's ``nprobe`` whose recall@K0 reaches sterling's index's (see the module doc): ``{"nprobe",
    "sterling": its recall, "faiss": {nprobe: recall}}``."""
    model, k0 = pieces.model, pieces.model.config.k0
    _, queries = model.encode(pieces.inputs([r["history"] for r in mix]))  # [B, T, D]
    b, t, d = queries.shape
    filters = [r["filter"] for r in mix]
    exact = [
        {int(i) for i in row if i >= 0}
        for r, q in zip(mix, queries)
        for row in _exact_rows(pieces, q, r["filter"], [], k0).tolist()
    ]
    served = pieces.index.search(
        queries.reshape(b * t, d), k=k0, filter=[f for f in filters for _ in range(t)], nprobe=model.config.nprobe
    ).ids
    sterling = _recall([set(pieces.rows_of([i for i in row if i >= 0]).tolist()) for row in served.tolist()], exact)
    distinct = list(dict.fromkeys(f for f in filters if f is not None))
    results = _post(filter_url + "/v1/filter", {"filters": distinct})["results"] if distinct else []
    allowed = dict(zip(distinct, results))
    requests = [{"queries": pack(q.numpy()), "allowed": allowed.get(f)} for q, f in zip(queries, filters)]
    faiss: dict[str, float] = {}

    def reaches(nprobe: int) -> bool:
        rows = unpack(_post(ann_url + "/v1/search", {"k": k0, "nprobe": nprobe, "requests": requests})["rows"], "int64")
        faiss[str(nprobe)] = _recall([{int(i) for i in row if i >= 0} for row in rows.reshape(b * t, k0)], exact)
        return faiss[str(nprobe)] >= sterling

    return {"nprobe": smallest_reaching(reaches, nlist), "sterling": sterling, "faiss": faiss, "queries": b * t}
