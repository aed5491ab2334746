"""A large served-model snapshot built without training, and a request mix: the serving load test's
and the serving tests' fixture.

:func:`build_serving_snapshot` writes what :func:`sterling.retrieval.publish.publish` writes (through
:func:`~sterling.retrieval.publish.write_model_snapshot`) over a synthetic catalogue and randomly
initialised, seeded towers (1,000,000 items: about 30 s and 3.6 GB of memory on 2 cores, 480 MB
on disk):

* **item embeddings** ``float [N, D]``, unit norm: the curved low-dimensional manifold of
  :func:`sterling.testing.embeddings.structured`, shifted towards one of 20 category centres, so
  the items cluster like learned embeddings do and an IVF index probing a few lists finds the
  nearest ones;
* **attributes** in the vocabulary of :mod:`sterling.data.synth` (whose filters therefore apply):
  ``category`` (20, skewed; the embedding's cluster), ``tags`` (1-4 of 60, mostly the category's
  own three), ``language`` (8, skewed), ``region`` (1-3 of 10), ``creator`` (Zipf over ``N / 20``
  creators, numbered from 1000 by popularity), ``year`` (1950-2025, recent years likelier), plus
  ``kids`` (0 / 1, likelier in some categories);
* **model** (``tower="two_tower"``, the default): the towers of the synthetic demo (tasks
  ``click``, ``like``, ``share``; its context and user features), a Mixture-of-Logits OverArch and
  the demo's Value Model. The user tower reads histories from the embedding cache, so no item tower
  (and no ``N``-row id table) is built: the item embeddings stand for its outputs.
* **model** (``tower="hstu"`` or ``"sasrec"``): what ``publish`` makes of a next-item retriever —
  a seeded random HSTU (1 head) or SASRec (2 heads) encoder as the user tower (``dim`` wide, 2
  layers, the latest 100 events; no features), its one query ``next`` (the user embedding itself),
  the index over the L2-normalised item embeddings. Without ``ranker`` the model serves the single
  task ``next`` by cosine, with no OverArch and no Value Model; with ``ranker`` a seeded random
  request-level :class:`~sterling.models.ranker.SequenceRanker` of the same encoder kind
  (``ranker_dim`` wide, 2 layers; its item table a fixed random projection of the item embeddings,
  so similar items look alike to it) scores the ``next`` query's candidates for the demo's tasks,
  and the demo's Value Model ranks them.

:func:`request_mix` draws the load test's requests: histories of 10-100 items around one to three
interests, a mix of filters from none to rare, and ``k`` from 10 to 100.

Example::

    model = load_model(build_serving_snapshot("runs/serve1m"))
    for r in request_mix(model, 1000, seed=0):
        model.recommend(r["history"], filter=r["filter"], k=r["k"])
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from sterling.data.synth import (
    CATEGORIES,
    DEMO_VALUE,
    LANGUAGE_SHARES,
    LANGUAGES,
    REGIONS,
    ROLES,
    TAG_SUFFIXES,
)
from sterling.index.item_index import IndexConfig
from sterling.models.overarch import OverArchConfig, make_overarch
from sterling.models.ranker import RankerConfig, SequenceRanker
from sterling.models.sequence_tower import SequenceTowerConfig, SequenceUserTower
from sterling.models.towers import TaskQueries, TwoTowerConfig, UserTower
from sterling.retrieval.config import ServingConfig
from sterling.retrieval.model import RetrievalModel
from sterling.retrieval.publish import NEXT_TASK, load_model, write_model_snapshot
from sterling.testing.embeddings import structured

__all__ = ["TOWERS", "build_serving_snapshot", "request_mix"]

#: The user towers :func:`build_serving_snapshot` builds.
TOWERS = ("two_tower", "hstu", "sasrec")
_SEQUENCE_HEADS = {"hstu": 1, "sasrec": 2}
_SEQUENCE_LAYERS, _SEQUENCE_MAX_LEN = 2, 100


TAGS = tuple(f"{c}-{s}" for c in CATEGORIES for s in TAG_SUFFIXES)
_KIDS_CATEGORIES = ("music", "gaming", "comedy", "pets", "art", "diy", "education")
_CATEGORY_SHARES = 1.0 / np.arange(1, len(CATEGORIES) + 1) ** 0.6  # the skew of sterling.data.synth


def build_serving_snapshot(
    out_dir: str | Path,
    num_items: int = 1_000_000,
    dim: int = 64,
    seed: int = 0,
    model_seed: int | None = None,
    overarch: str | None = "mol",
    k0: int = 200,
    nprobe: int = 32,
    value_formula: str | None = DEMO_VALUE,
    index_config: IndexConfig = IndexConfig(),
    tower: str = "two_tower",
    ranker: bool = False,
    ranker_dim: int = 64,
) -> Path:
    """Write a served model over ``num_items`` synthetic items to ``out_dir`` (see the module doc).

    Equal arguments write equal tensors and metadata (only the manifest's creation time differs).

    Args:
        out_dir (str | Path): the snapshot directory (replaced if it holds a snapshot).
        num_items (int): catalogue size ``N``.
        dim (int): embedding width ``D``.
        seed (int): seed of the catalogue (and of the weights, unless ``model_seed`` is given).
        model_seed (int | None): seed of the weights alone: another model over the same catalogue,
            as a retrained model's snapshot would be.
        overarch (str | None): OverArch kind ("mol" or "mlp"); None ranks by inner product. The
            two-tower's only: a sequence tower has none.
        k0 (int): candidates per task query (the largest ``k`` a request may ask for).
        nprobe (int): IVF lists each task query probes at least.
        value_formula (str | None): the Value Model over the task probabilities (the demo's, by
            default; a sequence tower without ``ranker`` serves ``next`` alone and takes none).
        index_config (IndexConfig): how the index is built (its ``nlist`` defaults to ~√N).
        tower (str): the user tower, one of :data:`TOWERS`.
        ranker (bool): score a sequence tower's candidates with a request-level ranker.
        ranker_dim (int): the ranker's token width.
    """
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    if ranker and tower == "two_tower":
        raise ValueError("the ranker stage follows a sequence tower (hstu or sasrec), not the two-tower")
    rng = np.random.default_rng(seed)
    category = rng.choice(len(CATEGORIES), num_items, p=rng.permutation(_CATEGORY_SHARES / _CATEGORY_SHARES.sum()))
    vectors = _embeddings(rng, category, dim)
    ids = np.sort(rng.choice(np.arange(1, 20 * num_items + 1), num_items, replace=False))
    attributes, num_terms = _attributes(rng, category)
    if tower != "two_tower":
        return _sequence_snapshot(
            Path(out_dir), tower, ranker, ranker_dim, ids, attributes, vectors, seed, model_seed, k0, nprobe,
            value_formula if ranker else None, index_config,
        )  # fmt: skip
    towers = TwoTowerConfig(
        num_items=num_items,
        num_terms=num_terms,
        tasks=tuple(ROLES.labels),
        context_features=tuple(ROLES.context),
        user_features=tuple(ROLES.user),
        dim=dim,
    )
    serving = ServingConfig(
        tasks=towers.tasks,
        features=towers.context_features + towers.user_features,
        k0=k0,
        nprobe=nprobe,
        value_formula=value_formula,
        max_history=towers.max_history,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed if model_seed is None else model_seed)
        user_tower, task_queries = UserTower(towers), TaskQueries(dim, len(towers.tasks))
        with torch.no_grad():  # a user near their history, tasks a little apart: like trained towers
            user_tower.mlp[-1].weight.mul_(0.1)
            task_queries.proj.weight.normal_(std=0.05)
        arch = (
            None
            if overarch is None
            else make_overarch(OverArchConfig(kind=overarch, dim=dim, num_tasks=len(towers.tasks))).eval()
        )
    source = {"synthetic": {"num_items": num_items, "dim": dim, "seed": seed, "model_seed": model_seed}}
    return write_model_snapshot(
        Path(out_dir),
        towers,
        user_tower,
        task_queries,
        arch,
        ids,
        attributes,
        torch.from_numpy(vectors),
        serving,
        index_config,
        source=source,
    )


def _sequence_snapshot(
    out_dir: Path,
    tower: str,
    ranker: bool,
    ranker_dim: int,
    ids: np.ndarray,
    attributes: list[dict],
    vectors: np.ndarray,
    seed: int,
    model_seed: int | None,
    k0: int,
    nprobe: int,
    value_formula: str | None,
    index_config: IndexConfig,
) -> Path:
    """:func:`build_serving_snapshot` with an HSTU / SASRec user tower (and a ranker)."""
    n, dim = vectors.shape
    towers = SequenceTowerConfig(tower, dim, _SEQUENCE_LAYERS, _SEQUENCE_HEADS[tower], _SEQUENCE_MAX_LEN)
    tasks = tuple(ROLES.labels) if ranker else (NEXT_TASK,)
    serving = ServingConfig(
        tasks=tasks,
        k0=k0,
        nprobe=nprobe,
        value_formula=value_formula,
        max_history=towers.max_history,
        queries=(NEXT_TASK,) if ranker else (),
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed if model_seed is None else model_seed)
        user_tower = SequenceUserTower(towers).eval()
        task_queries = TaskQueries(dim, 1)  # zero-initialised: the user embedding itself
        scorer = None
        if ranker:
            cfg = RankerConfig(
                num_items=n,
                tasks=tasks,
                encoder=tower,
                dim=ranker_dim,
                num_layers=2,
                num_heads=_SEQUENCE_HEADS[tower],
                dropout=0.0,
            )
            scorer = SequenceRanker(cfg)
            projection = torch.randn(dim, ranker_dim) / dim**0.5  # [D, Dr]: items near in D stay near
            with torch.no_grad():
                scorer.items.weight.copy_(torch.from_numpy(vectors) @ projection * dim**0.5)
            scorer.eval()
    source = {
        "synthetic": {
            "num_items": n,
            "dim": dim,
            "seed": seed,
            "model_seed": model_seed,
            "tower": tower,
            "ranker": ranker_dim if ranker else None,
        }
    }
    return write_model_snapshot(
        out_dir,
        towers,
        user_tower,
        task_queries,
        None,
        ids,
        attributes,
        torch.from_numpy(vectors),
        serving,
        index_config,
        source=source,
        ranker=scorer,
    )


def _embeddings(rng: np.random.Generator, category: np.ndarray, dim: int) -> np.ndarray:
    """float32 ``[N, D]`` unit vectors: :func:`structured` points, each moved by a unit step towards
    its ``category``'s random centre (int ``[N]``)."""
    centres = rng.standard_normal((len(CATEGORIES), dim))
    x = structured(rng, len(category), dim) + (centres / np.linalg.norm(centres, axis=1, keepdims=True))[category]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _attributes(rng: np.random.Generator, category: np.ndarray) -> tuple[list[dict], int]:
    """``N`` attribute dicts of items of ``category`` (int ``[N]``) and the number of distinct
    ``feature=value`` terms among them."""
    n = len(category)
    own = category[:, None] * 3 + rng.integers(0, 3, (n, 4))  # [N, 4] the category's tags
    tags = np.where(rng.random((n, 4)) < 0.75, own, rng.integers(0, len(TAGS), (n, 4)))
    creators = max(n // 20, 1)
    popularity = 1.0 / np.arange(1, creators + 1)
    kid_share = np.where(np.isin(np.array(CATEGORIES), _KIDS_CATEGORIES), 0.35, 0.03)
    columns = {
        "category": np.array(CATEGORIES, dtype=object)[category].tolist(),
        "tags": _lists(np.array(TAGS, dtype=object)[tags], rng.integers(1, 5, n)),
        "language": np.array(LANGUAGES, dtype=object)[rng.choice(len(LANGUAGES), n, p=LANGUAGE_SHARES)].tolist(),
        "region": _lists(np.array(REGIONS, dtype=object)[rng.integers(0, len(REGIONS), (n, 3))], rng.integers(1, 4, n)),
        "creator": (1000 + rng.choice(creators, n, p=popularity / popularity.sum())).tolist(),
        "year": np.maximum(2025 - rng.exponential(15.0, n).astype(np.int64), 1950).tolist(),
        "kids": (rng.random(n) < kid_share[category]).astype(np.int64).tolist(),
    }
    terms = sum(
        len({v for row in values for v in (row if isinstance(row, list) else [row])}) for values in columns.values()
    )
    return [dict(zip(columns, row)) for row in zip(*columns.values())], terms


def _lists(values: np.ndarray, counts: np.ndarray) -> list[list]:
    """Per row of ``values`` (object ``[N, W]``), its first ``counts`` (int ``[N]``) values without
    repeats."""
    return [list(dict.fromkeys(row[:c])) for row, c in zip(values.tolist(), counts.tolist())]


# (weight, filter template): ~30% unfiltered, broad terms, the kids-safe recency filter, language
# sets, narrower combinations, and a rare (~1%) creator.
_FILTERS = (
    (0.30, lambda r: None),
    (0.15, lambda r: f"category:{r.choice(CATEGORIES)}"),
    (0.12, lambda r: f"tags IN ({', '.join(r.sample(TAGS, r.randint(1, 3)))})"),
    (0.15, lambda r: f"year >= {r.choice((1980, 1990, 2000, 2010))} AND NOT kids:1"),
    (0.12, lambda r: f"language IN ({', '.join(r.sample(LANGUAGES, r.randint(1, 3)))})"),
    (0.08, lambda r: f"category:{r.choice(CATEGORIES)} AND language:{r.choice(LANGUAGES[:3])} AND year >= 2000"),
    (0.07, lambda r: f"(category:{' OR category:'.join(r.sample(CATEGORIES, 2))}) AND NOT region:{r.choice(REGIONS)}"),
    (0.01, lambda r: f"creator:{1000 + r.randint(5, 14)}"),
)
_KS, _K_WEIGHTS = (10, 20, 50, 100), (0.4, 0.25, 0.2, 0.15)


def request_mix(model: RetrievalModel | str | Path, n: int, seed: int = 0) -> list[dict]:
    """``n`` load-test requests over the catalogue of ``model`` (a :class:`RetrievalModel` or its
    snapshot directory), deterministic by ``seed``: dicts of ``history`` (10-100 item ids, oldest
    first, 80% of them near one to three "interests" — runs of the index's IVF order, so neighbours
    in embedding space — the rest anywhere), ``filter`` (a string or None, in the attribute
    vocabulary of :func:`build_serving_snapshot`) and ``k`` (10, 20, 50 or 100; at most ``k0``)."""
    if not isinstance(model, RetrievalModel):
        model = load_model(Path(model))
    ids = model.index.ids.tolist()  # IVF order: neighbours sit together
    rng, span = (
        random.Random(seed),
        len(ids) // model.index.executor_tensors()["centroids"].shape[0],
    )  # an IVF list's length
    weights, templates = zip(*_FILTERS)
    out = []
    for _ in range(n):
        interests = [rng.randrange(len(ids)) for _ in range(rng.randint(1, 3))]
        history = [
            ids[(rng.choice(interests) + rng.randrange(span)) % len(ids)] if rng.random() < 0.8 else rng.choice(ids)
            for _ in range(rng.randint(10, 100))
        ]
        k = min(rng.choices(_KS, _K_WEIGHTS)[0], model.config.k0)
        out.append({"history": history, "filter": rng.choices(templates, weights)[0](rng), "k": k})
    return out
