"""``sterling bench retrieval``: the quality table of SilverTorch's Table 3, in kind, and the
served sequential user towers (HSTU, SASRec) and most-popular beside it.

On each dataset: train the two-tower model and its OverArch (``sterling train`` defaults), publish,
and answer every held-out request (each user's last) over the whole catalogue, four ways:

* ``exact``: the primary task's query against the float item embeddings, brute force;
* ``int8_bloom``: the served model without OverArch: the index (int8 IVF + Bloom, exact filter check)
  ranked by inner product with the stored int8 vectors;
* ``overarch``: + OverArch over the merged per-task candidates, ranked by the primary task;
* ``overarch_vm``: + the Value Model over the task probabilities.

Beside them, the same held-out requests answered by:

* ``most_popular``: the items ranked by their count as positives of the primary task in the training
  requests (every request but the held-out ones; ties by catalogue row), one list for every request;
* ``hstu``, ``sasrec``: :func:`~sterling.train.retrieval.train_retrieval` (same budget for both:
  :attr:`RetrievalBenchConfig.sequence`, its encoder replaced) on the users' timelines **cut at
  their held-out request**: every event at or after the held-out request's ts is dropped from
  ``users.parquet`` (a truncated copy in the bench's temporary directory, beside ``items.parquet``
  and no ``requests.parquet``), so the request's engaged items are in a training sequence only when
  they also occur before it (checked). ``train_retrieval``'s own leave-last-out split runs on these
  cut timelines (validation selects the best epoch; ``patience`` stops). The best checkpoint is
  published with the bench's ``k0`` / ``nprobe`` and served: the request's history (timeline
  events before its ts, the latest ``max_len``) → :meth:`RetrievalModel.inputs` with the events'
  timestamps (``history_ts``, HSTU's time bias as in training) → top K. One run per seed of
  :attr:`RetrievalBenchConfig.seeds`; the row holds the mean and the standard error over seeds
  (``recall@K_se``; None with one seed) and each seed's numbers under ``per_seed``.
* ``hstu+ranker``: each seed's served HSTU with the request-level ranker as its scoring stage
  (``publish(..., ranker=)``): a :class:`~sterling.models.ranker.SequenceRanker` trained ROO-style
  (:func:`~sterling.train.ranking.train_ranker`, :attr:`RetrievalBenchConfig.ranker`) on every
  request but the held-out ones, re-scoring the K0 candidates of the index by the primary task's
  score, P(engage) × P(like | shown): the retriever's softmax over the candidates times the
  ranker's probability (:meth:`~sterling.retrieval.model.RetrievalModel.engagement_prior`). Does
  the ranker raise recall over the index's own order (the ``hstu`` row)? The held-out histories
  carry their action bitmasks, as the ranker read them in training.

Recall@K counts the held-out request's engaged items (positives of the primary task) in the top K;
``recall@K_unseen`` is the same with the user's whole history (every timeline event before the
request) excluded from the answer (``exclude=`` of the served model; masked for ``exact``; dropped
from the list for ``most_popular``); the engaged items themselves are not changed, so an engaged
item the user had seen before can no longer be found. QPS is requests answered per second at the
given batch size (model only, inputs prepared).

Ranking with the embedding cache: the same held-out requests each rank ``rank_candidates`` items
with :meth:`RetrievalModel.rank` (item state gathered from the cache) and by recomputing it (item
tower → rounding → OverArch item state), reporting both rates and whether the scores are identical.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sterling.bench.ann import DEFAULT_MOVIELENS, machine
from sterling.bench.report import Benchmark, mean_se, write_json
from sterling.data.batch import ItemCatalog, RequestBatch, RequestReader, UserTimelines
from sterling.data.items import read_items
from sterling.data.movielens import load_movielens
from sterling.data.schema import TIMELINE_COLUMNS, TIMELINE_TS, USER_ID, DatasetPaths, write_table
from sterling.data.synth import SynthConfig, generate
from sterling.models.towers import ItemTerms
from sterling.retrieval.inputs import UserInputs
from sterling.retrieval.item_table import cache_rows
from sterling.retrieval.model import RetrievalModel
from sterling.retrieval.publish import load_model, publish
from sterling.train.checkpoint import load_checkpoint
from sterling.train.encode import encode_catalog
from sterling.train.loop import TrainConfig, train
from sterling.train.metrics import recall_at_k, task_metrics
from sterling.train.ranking import RankingConfig, train_ranker
from sterling.train.retrieval import RetrievalConfig, train_retrieval
from sterling.train.split import holdout_requests

__all__ = [
    "ROWS",
    "SEQUENCE_ROWS",
    "TWO_TOWER_ROWS",
    "HeldOut",
    "RetrievalBenchConfig",
    "most_popular",
    "relative_gains",
    "run",
    "shown_quality",
    "truncated_dataset",
]

TWO_TOWER_ROWS = ("exact", "int8_bloom", "overarch", "overarch_vm")
SEQUENCE_ROWS = ("hstu", "sasrec")
RANKER_ROW = "hstu+ranker"
ROWS = ("most_popular", *TWO_TOWER_ROWS, *SEQUENCE_ROWS, RANKER_ROW)
KS = (20, 50, 100, 200, 500)
#: The cut-off of the relative comparison printed under the table.
COMPARE_AT = 50
_NO_LIMIT = 1 << 40


@dataclass(frozen=True)
class RetrievalBenchConfig:
    """One benchmark run.

    Args:
        synth (SynthConfig): the synthetic dataset.
        train (TrainConfig): two-tower + OverArch training.
        sequence (RetrievalConfig): the HSTU and SASRec runs (the encoder and seed are replaced per
            row and seed; the rest, the budget included, is the same for both): GR's sizes (dim 50,
            max_len 200), at most 30 epochs, stopped after 5 without a better validation NDCG@10.
        seeds (tuple[int, ...]): one sequence run per seed and encoder.
        ranker (RankingConfig): the ranker of the ``hstu+ranker`` row (its seed replaced per seed).
        sequence_rows (tuple[str, ...]): which of ``hstu``, ``sasrec`` and ``hstu+ranker`` to run
            (``hstu+ranker`` trains the ``hstu`` row's models too, and reports that row);
            most-popular and the two-tower rows always run.
        k0 (int): candidates per task query.
        nprobe (int | None): lists probed (None: the index default).
        value_formula (str | None): the Value Model of the last row (None: a default over the tasks).
        batch (int): requests per forward.
        rank_candidates (int): items each request ranks in the cached-vs-recomputed comparison.
        seed (int): seed.
    """

    synth: SynthConfig = SynthConfig()
    train: TrainConfig = TrainConfig()
    sequence: RetrievalConfig = RetrievalConfig(epochs=30, patience=5)
    seeds: tuple[int, ...] = (0, 1)
    ranker: RankingConfig = RankingConfig(dim=32, num_layers=2, epochs=2, token_budget=2048, micro_tokens=2048)
    sequence_rows: tuple[str, ...] = (*SEQUENCE_ROWS, RANKER_ROW)
    k0: int = 1000
    nprobe: int | None = None
    value_formula: str | None = None
    batch: int = 64
    rank_candidates: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.sequence_rows) - {*SEQUENCE_ROWS, RANKER_ROW}
        if unknown or not self.sequence_rows:
            raise ValueError(
                f"sequence_rows must be a non-empty subset of {[*SEQUENCE_ROWS, RANKER_ROW]}, got {list(self.sequence_rows)}"
            )

    @classmethod
    def quick(cls) -> RetrievalBenchConfig:
        from sterling.train.overarch import OverArchTrainConfig

        return cls(
            synth=replace(SynthConfig(), num_users=300, num_items=1000),
            train=TrainConfig(epochs=1, overarch=OverArchTrainConfig(epochs=1)),
            sequence=RetrievalConfig(dim=16, num_layers=1, max_len=50, epochs=1, batch_size=64, num_negatives=32),
            seeds=(0,),
            ranker=RankingConfig(dim=16, num_layers=1, epochs=1, max_steps=3),
            k0=600,
            batch=32,
        )


def default_formula(tasks: tuple[str, ...]) -> str:
    """Weights halving per task after the first: ``click + 0.5*like + 0.25*share``."""
    return " + ".join(name if i == 0 else f"{0.5**i:g}*{name}" for i, name in enumerate(tasks))


def user_inputs(model: RetrievalModel, batch: RequestBatch, item_ids: np.ndarray) -> UserInputs:
    """The :class:`UserInputs` of a training batch's requests (catalogue rows → segment rows)."""
    feats = {**batch.context, **batch.user_features}
    columns = [feats.get(n, torch.zeros(batch.num_requests, dtype=torch.int64)) for n in model.config.features]
    features = torch.stack(columns, 1) if columns else torch.zeros(batch.num_requests, 0, dtype=torch.int64)
    return UserInputs(
        model.rows_of(torch.from_numpy(item_ids[batch.history_items.numpy()])),
        batch.history_actions,
        batch.history_offsets,
        features,
    )


@dataclass(frozen=True)
class HeldOut:
    """The held-out requests (``H``), in file order, as every row answers them.

    Attributes:
        inputs (list[UserInputs]): the two-tower model's inputs, in batches (``slices``).
        slices (list[slice]): the requests of each batch.
        relevant (list[set[int]]): each request's engaged item ids (primary task).
        user_ids, ts (np.ndarray): int64 ``[H]``.
        history, history_ts, history_actions (list[np.ndarray]): each request's whole history
            (timeline events before its ts, oldest first): item ids, event times and action
            bitmasks, int64.
        shown, labels (list[np.ndarray]): each request's impressions: item ids int64 ``[k]`` and
            labels float32 ``[k, T]``.
    """

    inputs: list[UserInputs]
    slices: list[slice]
    relevant: list[set[int]]
    user_ids: np.ndarray
    ts: np.ndarray
    history: list[np.ndarray] = field(repr=False)
    history_ts: list[np.ndarray] = field(repr=False)
    history_actions: list[np.ndarray] = field(repr=False)
    shown: list[np.ndarray] = field(repr=False)
    labels: list[np.ndarray] = field(repr=False)

    def seen(self, part: slice) -> list[list[int]]:
        """The history item ids of the requests ``part`` (what ``exclude_seen`` leaves out)."""
        return [h.tolist() for h in self.history[part]]


def _held_out(
    data_dir: Path, model: RetrievalModel, item_ids: np.ndarray, max_history: int, primary: int, batch: int
) -> HeldOut:
    """The held-out requests in batches of ``batch``, each one's engaged item ids and whole history."""
    reader = RequestReader(data_dir, ItemCatalog(item_ids), max_history, token_budget=10**9)
    inputs, slices, relevant, users, ts, shown, labels = [], [], [], [], [], [], []
    for full in reader.batches(only=holdout_requests(DatasetPaths(data_dir).requests)):
        for lo in range(0, full.num_requests, batch):
            part = full.requests(lo, min(lo + batch, full.num_requests))
            inputs.append(user_inputs(model, part, item_ids))
            slices.append(slice(len(relevant), len(relevant) + part.num_requests))
            owner = part.impression_to_request().numpy()
            engaged = part.labels[:, primary].numpy() > 0
            ids = item_ids[part.item_rows.numpy()]
            relevant += [set(ids[engaged & (owner == r)].tolist()) for r in range(part.num_requests)]
            shown += [ids[owner == r] for r in range(part.num_requests)]
            labels += [part.labels.numpy()[owner == r] for r in range(part.num_requests)]
            users.append(part.user_ids.numpy())
            ts.append(part.ts.numpy())
    users = np.concatenate(users) if users else np.zeros(0, dtype=np.int64)
    ts = np.concatenate(ts) if ts else np.zeros(0, dtype=np.int64)
    timelines = reader.timelines
    start, end = timelines.history_bounds(users, ts, _NO_LIMIT)
    history = [item_ids[timelines.item_rows[a:b]] for a, b in zip(start, end)]
    history_ts = [timelines.ts[a:b].copy() for a, b in zip(start, end)]
    history_actions = [timelines.actions[a:b].copy() for a, b in zip(start, end)]
    return HeldOut(inputs, slices, relevant, users, ts, history, history_ts, history_actions, shown, labels)


def shown_quality(model: RetrievalModel, held: HeldOut) -> dict[str, dict[str, float]]:
    """AUC, NE and GAUC per task of ``model``'s scores (:meth:`RetrievalModel.rank`: OverArch's
    probabilities) of the held-out requests' shown impressions: what the ranker's held-out metrics
    (:func:`~sterling.train.ranking.evaluate_ranker`) measure of it, on the same requests."""
    logits, labels, groups = [], [], []
    for x, part in zip(held.inputs, held.slices):
        shown = held.shown[part]
        lengths = torch.tensor([len(s) for s in shown])
        width = int(lengths.max())
        ids = torch.from_numpy(np.stack([np.resize(s, width) for s in shown]))  # [B, width], repeats pad
        scores = model.rank(x, ids)  # [B, width, T] probabilities
        real = torch.arange(width) < lengths[:, None]
        logits.append(torch.logit(scores[real].double(), eps=1e-7).float())
        labels.append(torch.from_numpy(np.concatenate(held.labels[part])))
        groups.append(torch.arange(part.start, part.stop).repeat_interleave(lengths))
    return task_metrics(torch.cat(logits), torch.cat(labels), torch.cat(groups), model.config.tasks)


def _timed(answer, inputs: list[UserInputs]) -> tuple[torch.Tensor, float]:
    """Every batch answered (ids ``[H, 500]``) and the requests per second (best of two passes)."""
    best, out = float("inf"), None
    for _ in range(2):
        t0 = time.perf_counter()
        out = [answer(x) for x in inputs]
        best = min(best, time.perf_counter() - t0)
    return torch.cat(out), sum(x.batch_size for x in inputs) / best


def _recalls(ranked: torch.Tensor, unseen: torch.Tensor, relevant: list[set[int]]) -> dict[str, float]:
    """``recall@K`` of ``ranked`` and ``recall@K_unseen`` of ``unseen`` (ids ``[H, >= max(KS)]``)."""
    out = {f"recall@{k}": recall_at_k(ranked, relevant, k) for k in KS}
    return out | {f"recall@{k}_unseen": recall_at_k(unseen, relevant, k) for k in KS}


def _recall_keys() -> list[str]:
    return [f"recall@{k}{tail}" for tail in ("", "_unseen") for k in KS]


def _log_row(log, name: str, row: str, out: dict, note: str = "") -> None:
    seen = " ".join(f"{out[f'recall@{k}']:.4f}" for k in KS)
    unseen = " ".join(f"{out[f'recall@{k}_unseen']:.4f}" for k in KS)
    log(f"  {name:<14} {row:<12} R@{'/'.join(map(str, KS))} {seen} | unseen {unseen}{note}")


# ------------------------------------------------------------------------------------ most popular


def most_popular(data_dir: Path, item_ids: np.ndarray, primary: int) -> np.ndarray:
    """Every catalogue item id ``int64 [N]``, most engaged first: the count of each item as a
    positive of task ``primary`` in the training requests (all but :func:`holdout_requests`), ties
    broken by catalogue row. The held-out requests are never read."""
    reader = RequestReader(data_dir, ItemCatalog(item_ids), 1, token_budget=10**9)
    counts = np.zeros(len(item_ids), dtype=np.int64)
    for batch in reader.batches(exclude=holdout_requests(DatasetPaths(data_dir).requests)):
        engaged = batch.labels[:, primary].numpy() > 0
        np.add.at(counts, batch.item_rows.numpy()[engaged], 1)
    return item_ids[np.lexsort((np.arange(len(item_ids)), -counts))]


def _top_without(ranked: np.ndarray, seen: list[np.ndarray], k: int) -> torch.Tensor:
    """ids ``[H, k]``: the first ``k`` of ``ranked`` not in each request's ``seen`` (-1 padded)."""
    out = np.full((len(seen), k), -1, dtype=np.int64)
    for r, s in enumerate(seen):
        keep = ranked[~np.isin(ranked, s)][:k]
        out[r, : len(keep)] = keep
    return torch.from_numpy(out)


def _popular_row(data_dir: Path, name: str, item_ids: np.ndarray, primary: int, held: HeldOut, log) -> dict:
    kmax = max(KS)
    ranked = most_popular(data_dir, item_ids, primary)
    top = torch.from_numpy(ranked[:kmax]).expand(len(held.relevant), -1)
    out = {"row": "most_popular", "dataset": name, "requests": len(held.relevant), "qps": None}
    out |= {"value_formula": None, "seeds": None}
    out |= _recalls(top, _top_without(ranked, held.history, kmax), held.relevant)
    out |= {f"{key}_se": None for key in _recall_keys()}
    _log_row(log, name, "most_popular", out)
    return out


# ------------------------------------------------------------------------------ sequence models


def truncated_dataset(data_dir: Path, out_dir: Path, user_ids: np.ndarray, ts: np.ndarray) -> Path:
    """A copy of ``data_dir`` for training on the past only: ``users.parquet`` with each user of
    ``user_ids`` keeping only the timeline events before its ``ts`` (other users whole), and
    ``items.parquet``; no ``requests.parquet``. Returns ``out_dir``."""
    paths, out = DatasetPaths(data_dir), DatasetPaths(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(paths.users)
    users = table.column(USER_ID).to_numpy()
    order = np.argsort(users, kind="stable")
    at = order[np.minimum(np.searchsorted(users[order], user_ids), len(users) - 1)]
    if len(at) and not np.array_equal(users[at], user_ids):
        raise ValueError(f"{paths.users}: held-out users missing from the users table")
    cut = np.full(len(users), np.iinfo(np.int64).max, dtype=np.int64)
    cut[at] = ts
    event_ts = table.column(TIMELINE_TS).combine_chunks()
    lengths = np.diff(event_ts.offsets.to_numpy().astype(np.int64))
    owner = np.repeat(np.arange(len(users)), lengths)
    keep = event_ts.flatten().to_numpy() < cut[owner]
    offsets = np.zeros(len(users) + 1, dtype=np.int32)
    np.cumsum(np.bincount(owner[keep], minlength=len(users)), out=offsets[1:])
    for name in TIMELINE_COLUMNS:
        i = table.schema.get_field_index(name)
        values = table.column(name).combine_chunks().flatten().filter(pa.array(keep))
        column = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values).cast(table.schema.field(i).type)
        table = table.set_column(i, table.schema.field(i), column)
    write_table(table.replace_schema_metadata(pq.read_schema(paths.users).metadata), out.path("users"))
    shutil.copyfile(paths.items, out.path("items"))
    return out_dir


def _check_no_leak(seq_data: Path, item_ids: np.ndarray, held: HeldOut) -> None:
    """Every held-out user's training timeline is exactly its held-out request's history."""
    catalog = ItemCatalog(item_ids)
    timelines = UserTimelines.read(DatasetPaths(seq_data).users, catalog)
    u = timelines.user_index(held.user_ids)
    for i, (a, b) in enumerate(zip(timelines.offsets[u], timelines.offsets[u + 1])):
        if not (
            np.array_equal(item_ids[timelines.item_rows[a:b]], held.history[i])
            and np.array_equal(timelines.ts[a:b], held.history_ts[i])
            and (b == a or timelines.ts[b - 1] < held.ts[i])
        ):
            raise RuntimeError(f"user {held.user_ids[i]}: the training timeline is not the held-out history")


def _sequence_inputs(model: RetrievalModel, held: HeldOut) -> list[UserInputs]:
    """The held-out requests' inputs of a served sequence model: the latest ``max_history`` events
    before each request, with their action bitmasks (what a ranker stage reads), timestamps and
    the request's time (HSTU's time bias)."""
    keep = model.config.max_history
    out = []
    for part in held.slices:
        hs, ts = held.history[part], held.history_ts[part]
        actions = [a[-keep:].tolist() for a in held.history_actions[part]]
        x = model.inputs([h[-keep:].tolist() for h in hs], actions)
        stamps = np.concatenate([t[-keep:] for t in ts]) if ts else np.zeros(0, dtype=np.int64)
        request_ts = torch.from_numpy(np.asarray(held.ts[part], dtype=np.int64))
        out.append(replace(x, history_ts=torch.from_numpy(stamps.astype(np.int64)), request_ts=request_ts))
    return out


def _sequence_rows(
    data_dir: Path, name: str, item_ids: np.ndarray, held: HeldOut, cfg: RetrievalBenchConfig, work: Path, log
) -> list[dict]:
    """The ``hstu`` and ``sasrec`` rows: trained on the cut timelines, published, served."""
    seq_data = truncated_dataset(data_dir, work / "sequence-data", held.user_ids, held.ts)
    _check_no_leak(seq_data, item_ids, held)
    items = DatasetPaths(data_dir).items
    kmax = max(KS)
    rows = []
    ranked_by_ranker = []
    wanted = set(cfg.sequence_rows) | ({"hstu"} if RANKER_ROW in cfg.sequence_rows else set())
    for encoder in (e for e in SEQUENCE_ROWS if e in wanted):
        per_seed = []
        for seed in cfg.seeds:
            rc = replace(cfg.sequence, encoder=encoder, seed=seed)
            out = work / f"{encoder}-{seed}"
            log(f"  {name:<14} {encoder} seed {seed}: training on the timelines cut at the held-out requests")
            t0 = time.perf_counter()
            report = train_retrieval(seq_data, rc, log=lambda s: log(f"    {s}"), out_dir=out / "checkpoint")
            train_s = time.perf_counter() - t0
            snapshot = publish(out / "checkpoint" / "best", items, out / "snapshot", k0=cfg.k0, nprobe=cfg.nprobe)
            model = load_model(snapshot)
            inputs = _sequence_inputs(model, held)
            ranked, qps = _timed(lambda x, m=model: m(x, k=kmax).ids, inputs)
            unseen = torch.cat([model(x, k=kmax, exclude=held.seen(p)).ids for x, p in zip(inputs, held.slices)])
            one = {"seed": seed, "qps": qps, "train_s": train_s, "best_epoch": report.best_epoch}
            one |= {"epochs": report.epochs, "valid": report.valid, "test": report.test}
            one |= _recalls(ranked, unseen, held.relevant)
            _log_row(log, name, f"{encoder}/{seed}", one, f"  {qps:,.0f} QPS, best epoch {report.best_epoch}")
            per_seed.append(one)
            if encoder == "hstu" and RANKER_ROW in cfg.sequence_rows:
                ranked_by_ranker.append(_ranker_seed(data_dir, name, held, cfg, seed, out, log))
        rows.append(_seeds_row(encoder, name, held, cfg, per_seed, asdict(replace(cfg.sequence, encoder=encoder))))
    if ranked_by_ranker:
        rows.append(_seeds_row(RANKER_ROW, name, held, cfg, ranked_by_ranker, asdict(cfg.ranker)))
    return rows


def _seeds_row(
    row_name: str, name: str, held: HeldOut, cfg: RetrievalBenchConfig, per_seed: list, config: dict
) -> dict:
    """A row of per-seed results: mean and standard error of every recall, the seeds kept."""
    row = {"row": row_name, "dataset": name, "requests": len(held.relevant), "value_formula": None}
    row |= {"qps": float(np.mean([s["qps"] for s in per_seed])), "seeds": list(cfg.seeds)}
    for key in _recall_keys():
        row[key], row[f"{key}_se"] = mean_se([s[key] for s in per_seed])
    return row | {"config": config, "per_seed": per_seed}


def _ranker_seed(
    data_dir: Path, name: str, held: HeldOut, cfg: RetrievalBenchConfig, seed: int, out: Path, log
) -> dict:
    """One seed of the ``hstu+ranker`` row: train the ranker on the non-held-out requests, publish
    this seed's HSTU with it, answer the held-out requests."""
    log(f"  {name:<14} ranker seed {seed}: ROO training on every request but the held-out ones")
    t0 = time.perf_counter()
    ranking = train_ranker(
        data_dir, replace(cfg.ranker, seed=seed), log=lambda s: log(f"    {s}"), out_dir=out / "ranker"
    )
    train_s = time.perf_counter() - t0
    items = DatasetPaths(data_dir).items
    snapshot = publish(
        out / "checkpoint" / "best", items, out / "snapshot-ranker", k0=cfg.k0, nprobe=cfg.nprobe, ranker=out / "ranker"
    )
    model = load_model(snapshot)
    inputs = _sequence_inputs(model, held)
    kmax = max(KS)
    ranked, qps = _timed(lambda x, m=model: m(x, k=kmax).ids, inputs)
    unseen = torch.cat([model(x, k=kmax, exclude=held.seen(p)).ids for x, p in zip(inputs, held.slices)])
    one = {"seed": seed, "qps": qps, "train_s": train_s}
    one["shown"] = {"auc": ranking.auc, "ne": ranking.ne, "gauc": ranking.gauc}
    one |= _recalls(ranked, unseen, held.relevant)
    _log_row(log, name, f"{RANKER_ROW}/{seed}", one, f"  {qps:,.0f} QPS")
    return one


# ------------------------------------------------------------------------------------- the table


def _dataset_rows(data_dir: Path, name: str, cfg: RetrievalBenchConfig, work: Path, log) -> tuple[list[dict], dict]:
    report = train(data_dir, work / "checkpoint", cfg.train, log=lambda s: log(f"  {s}"))
    snapshot = publish(report.checkpoint, DatasetPaths(data_dir).items, work / "snapshot", k0=cfg.k0, nprobe=cfg.nprobe)
    model = load_model(snapshot)
    tasks = model.config.tasks
    formula = cfg.value_formula or default_formula(tasks)
    ckpt = load_checkpoint(report.checkpoint)
    item_ids, attributes, _ = read_items(DatasetPaths(data_dir).items)
    vectors = encode_catalog(ckpt.model, ItemTerms.build(attributes, vocab=ckpt.term_vocab), len(item_ids))
    primary = model.config.primary
    held = _held_out(data_dir, model, item_ids, model.config.max_history, primary, cfg.batch)
    inputs = held.inputs
    kmax = max(KS)
    variants = {
        "int8_bloom": load_model(snapshot, use_overarch=False),
        "overarch": load_model(snapshot, value_formula=None),
        "overarch_vm": load_model(snapshot, value_formula=formula),
    }
    catalog = ItemCatalog(item_ids)

    def exact(x: UserInputs, seen: list[list[int]] | None = None) -> torch.Tensor:
        with torch.no_grad():
            _, queries = model.encode(x)
            scores = queries[:, primary] @ vectors.T
            for r, ids in enumerate(seen or []):
                scores[r, torch.from_numpy(catalog.rows(np.asarray(ids, dtype=np.int64)))] = float("-inf")
            top = torch.topk(scores, min(kmax, len(item_ids)), dim=1)
        ids = torch.from_numpy(item_ids)[top.indices]
        return ids.masked_fill(torch.isinf(top.values), -1)

    answers = {"exact": exact}
    answers |= {row: (lambda x, seen=None, m=m: m(x, k=kmax, exclude=seen).ids) for row, m in variants.items()}
    rows = [_popular_row(data_dir, name, item_ids, primary, held, log)]
    for row in TWO_TOWER_ROWS:
        ranked, qps = _timed(answers[row], inputs)
        unseen = torch.cat([answers[row](x, held.seen(p)) for x, p in zip(inputs, held.slices)])
        out = {
            "row": row,
            "dataset": name,
            "requests": len(held.relevant),
            "qps": qps,
            "value_formula": formula if row == "overarch_vm" else None,
            "seeds": [cfg.seed],
        }
        out |= _recalls(ranked, unseen, held.relevant)
        out |= {f"{key}_se": None for key in _recall_keys()}
        if row == "overarch":
            out["shown"] = shown_quality(variants[row], held)
        _log_row(log, name, row, out, f"  {qps:,.0f} QPS")
        rows.append(out)
    ranking = _ranking(model, ckpt, ItemTerms.build(attributes, vocab=ckpt.term_vocab), inputs, cfg, name)
    log(
        f"  {name:<14} ranking {cfg.rank_candidates} items/request: cache {ranking['cached_qps']:,.0f} vs recompute "
        f"{ranking['recompute_qps']:,.0f} requests/s ({ranking['speedup']:.1f}x), identical scores: {ranking['identical']}"
    )
    rows += _sequence_rows(data_dir, name, item_ids, held, cfg, work, log)
    return rows, ranking


def _ranking(
    model: RetrievalModel, ckpt, item_terms: ItemTerms, inputs: list[UserInputs], cfg: RetrievalBenchConfig, name: str
) -> dict:
    """The ranking entry point with the cache against recomputing the item side per request."""
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = model.index.ids
    n = len(ids)
    item_ids = [ids[torch.randint(n, (x.batch_size, cfg.rank_candidates), generator=gen)] for x in inputs]
    catalog = ItemCatalog(ckpt.item_ids)

    def recomputed(x: UserInputs, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            users, queries = model.encode(x)
            rows = torch.from_numpy(catalog.rows(ids.reshape(-1).numpy()))
            state = cache_rows(ckpt.model.encode_items(rows, item_terms), model.overarch, model.items.dtype)
            history, mask = model.history(x)
            logits = model.overarch(users, queries, history, mask, state.float().view(*ids.shape, -1))
        return torch.sigmoid(logits)

    timings, scores = {}, {}
    for label, fn in (("cached", model.rank), ("recompute", recomputed)):
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            out = [fn(x, ids) for x, ids in zip(inputs, item_ids)]
            best = min(best, time.perf_counter() - t0)
        timings[label], scores[label] = sum(x.batch_size for x in inputs) / best, torch.cat(out)
    diff = float((scores["cached"] - scores["recompute"]).abs().max())
    return {
        "dataset": name,
        "candidates_per_request": cfg.rank_candidates,
        "cached_qps": timings["cached"],
        "recompute_qps": timings["recompute"],
        "speedup": timings["cached"] / timings["recompute"],
        "identical": bool(torch.equal(scores["cached"], scores["recompute"])),
        "max_abs_diff": diff,
    }


def run(cfg: RetrievalBenchConfig, movielens: Path | None = None, log=print, synthetic: bool = True) -> dict:
    """Every row on the synthetic default (unless ``synthetic`` is False) and on ``movielens`` when given."""
    torch.manual_seed(cfg.seed)
    rows, ranking = [], []
    with tempfile.TemporaryDirectory(prefix="sterling-bench-retrieval-") as tmp:
        work = Path(tmp)
        datasets = []
        if synthetic:
            log(f"synthetic default: {cfg.synth.num_users:,} users, {cfg.synth.num_items:,} items")
            datasets.append(("synthetic", generate(cfg.synth, work / "synthetic" / "data")))
        if movielens is not None:
            log(f"MovieLens: {movielens}")
            datasets.append((movielens.name, load_movielens(movielens, work / movielens.name / "data")))
        for name, data in datasets:
            found, ranked = _dataset_rows(data, name, cfg, work / name, log)
            rows += found
            ranking.append(ranked)
    result = {"machine": machine(), "config": asdict(cfg), "rows": rows, "ranking": ranking}
    return result | {"relative": relative_gains(result)}


def relative_gains(result: dict, k: int = COMPARE_AT) -> list[dict]:
    """Per dataset and sequence row: its recall@k (and ``_unseen``) relative to ``most_popular`` and
    to the best two-tower row (``recall / baseline - 1``)."""
    out = []
    for name in dict.fromkeys(r["dataset"] for r in result["rows"]):
        rows = {r["row"]: r for r in result["rows"] if r["dataset"] == name}
        for row in SEQUENCE_ROWS:
            if row not in rows:
                continue
            gain = {"dataset": name, "row": row, "k": k}
            for tail in ("", "_unseen"):
                key = f"recall@{k}{tail}"
                best = max(TWO_TOWER_ROWS, key=lambda t: rows[t][key])
                gain[f"two_tower{tail}"] = best
                gain[f"vs_two_tower{tail}"] = _gain(rows[row][key], rows[best][key])
                gain[f"vs_most_popular{tail}"] = _gain(rows[row][key], rows["most_popular"][key])
            out.append(gain)
    return out


def _gain(value: float, baseline: float) -> float:
    return value / baseline - 1 if baseline > 0 else float("nan")


def _cell(r: dict, key: str) -> str:
    se = r.get(f"{key}_se")
    return f"{r[key]:.4f}" + (f"±{se:.4f}" if se is not None else "")


def format_table(result: dict) -> str:
    width = 13
    lines = []
    for tail, title in (
        ("", "recall@K (history included)"),
        ("_unseen", "recall@K, the history excluded (exclude_seen)"),
    ):
        head = f"{'dataset':<14} {'row':<12} " + " ".join(f"{'R@' + str(k):>{width}}" for k in KS)
        head += f" {'QPS':>9}" if not tail else ""
        lines += [title, head, "-" * len(head)]
        for r in result["rows"]:
            line = f"{r['dataset']:<14} {r['row']:<12} " + " ".join(
                f"{_cell(r, f'recall@{k}{tail}'):>{width}}" for k in KS
            )
            if not tail:
                line += f" {r['qps']:>9,.0f}" if r.get("qps") is not None else f" {'-':>9}"
            lines.append(line)
        lines.append("")
    lines.append(f"recall@{COMPARE_AT} of the sequence rows relative to most_popular and the best two-tower row")
    for g in relative_gains(result):
        lines.append(
            f"{g['dataset']:<14} {g['row']:<7} vs most_popular {g['vs_most_popular']:+.1%} "
            f"(unseen {g['vs_most_popular_unseen']:+.1%}), vs {g['two_tower']} {g['vs_two_tower']:+.1%} "
            f"(unseen, vs {g['two_tower_unseen']}: {g['vs_two_tower_unseen']:+.1%})"
        )
    lines.append("recall@20 of the ranker stage over the index's own order (hstu+ranker vs hstu)")
    for name in dict.fromkeys(r["dataset"] for r in result["rows"]):
        rows = {r["row"]: r for r in result["rows"] if r["dataset"] == name}
        if RANKER_ROW in rows and "hstu" in rows:
            a, b = rows[RANKER_ROW], rows["hstu"]
            lines.append(
                f"{name:<14} {a['recall@20']:.4f} vs {b['recall@20']:.4f} ({_gain(a['recall@20'], b['recall@20']):+.1%}); "
                f"unseen {a['recall@20_unseen']:.4f} vs {b['recall@20_unseen']:.4f}"
            )
    lines.append("held-out shown impressions, per task AUC / GAUC / NE: OverArch, then the ranker of each seed")
    for name in dict.fromkeys(r["dataset"] for r in result["rows"]):
        rows = {r["row"]: r for r in result["rows"] if r["dataset"] == name}
        if RANKER_ROW in rows and "shown" in rows.get("overarch", {}):
            ranker = [s["shown"] for s in rows[RANKER_ROW]["per_seed"]]
            for task in rows["overarch"]["shown"]["auc"]:
                cells = []
                for who in (rows["overarch"]["shown"], *ranker):
                    cells.append("/".join(f"{who[m][task]:.3f}" for m in ("auc", "gauc", "ne")))
                lines.append(f"{name:<14} {task:<8} overarch {cells[0]}  ranker {'  '.join(cells[1:])}")
    lines += ["", f"{'dataset':<14} {'ranking: cached':>16} {'recomputed':>11} {'speed-up':>9} identical"]
    for r in result["ranking"]:
        lines.append(
            f"{r['dataset']:<14} {r['cached_qps']:>16,.0f} {r['recompute_qps']:>11,.0f} "
            f"{r['speedup']:>8.1f}x {r['identical']}"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a small synthetic run (smoke test)")
    p.add_argument(
        "--movielens",
        default=str(DEFAULT_MOVIELENS.parent / "ml-100k"),
        metavar="DIR",
        help="MovieLens directory ('none' to skip; default: %(default)s when present)",
    )
    p.add_argument("--seeds", metavar="LIST", help="seeds of the hstu / sasrec rows (default: 0,1; --quick: 0)")
    p.add_argument("--epochs", type=int, metavar="N", help="most epochs of the hstu / sasrec runs (default: 30)")
    p.add_argument(
        "--patience", type=int, metavar="N", help="stop a hstu / sasrec run after N epochs without a better validation"
    )
    p.add_argument(
        "--sequence-rows",
        metavar="LIST",
        help=f"which of {','.join((*SEQUENCE_ROWS, RANKER_ROW))} to run (default: all; the others always run)",
    )
    p.add_argument("--no-synthetic", action="store_true", help="skip the synthetic dataset (MovieLens only)")
    p.add_argument("--threads", type=int, metavar="N", help="torch threads (default: torch's)")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON")


def cli(args: argparse.Namespace) -> int:
    cfg = RetrievalBenchConfig.quick() if args.quick else RetrievalBenchConfig()
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(int(s) for s in args.seeds.split(",") if s.strip()))
    if args.epochs is not None:
        cfg = replace(cfg, sequence=replace(cfg.sequence, epochs=args.epochs))
    if args.patience is not None:
        cfg = replace(cfg, sequence=replace(cfg.sequence, patience=args.patience))
    if args.sequence_rows:
        try:
            cfg = replace(cfg, sequence_rows=tuple(r.strip() for r in args.sequence_rows.split(",") if r.strip()))
        except ValueError as e:
            print(f"--sequence-rows: {e}")
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    ml = None if args.movielens in (None, "none") or args.quick else Path(args.movielens)
    if ml is not None and not ml.is_dir():
        print(f"MovieLens data not found at {ml}; synthetic only")
        ml = None
    if args.no_synthetic and ml is None:
        print("--no-synthetic without MovieLens data: nothing to run")
        return 2
    result = run(cfg, ml, synthetic=not args.no_synthetic)
    print(format_table(result))
    write_json(args.json, result)
    return 0


BENCHMARK = Benchmark(
    "retrieval",
    "the quality table: most-popular, the two-tower (exact, int8 + Bloom, + OverArch, + Value Model), HSTU, SASRec",
    add_arguments,
    cli,
)
