"""``sterling bench quality``: the sequential-recommendation quality table, HSTU against SASRec
with identical budgets, the published references beside them.

On each MovieLens set (ML-100K and the ML-1M subset, converted with
:func:`~sterling.data.movielens.load_movielens`), for each encoder (``hstu``, ``sasrec``) and seed,
:func:`~sterling.train.retrieval.train_retrieval` with :attr:`QualityBenchConfig.sequence` (only the
encoder and the seed differ). By default GR's split and budget: each user's timeline trains up to
its last event (``holdout = 1``), 30 epochs at lr 4e-3 with 100 warm-up steps and a cosine decay,
the last epoch's model reported (nothing is validated, so nothing is selected); ``holdout = 2``
holds out the second-to-last event too, and validation NDCG@10 after every epoch selects the
reported epoch (``patience`` stops a run). ``--layers 8 --train-events all`` (both models 8 layers
deep, every event of a timeline a training target) is the budget of docs/benchmarks.md's latest
table. The test targets (the same users and targets either way) are ranked over the whole catalogue
under two protocols:

* **history kept**: the full corpus, the user's earlier items **not** excluded (keys ``hr@10`` …),
  the protocol issue 21 sets its bar in (it calls it GR's);
* **seen excluded**: every item of the user's timeline before the target removed from the ranking
  (keys ``unseen/hr@10`` …), the common protocol on data without repeats, and what GR's evaluation
  code does (``research/data/eval.py``: ``filter_invalid_ids=True`` removes the history window, the
  latest 200 items) behind the generative-recommenders README table (spec ``roo.md`` §7.2).

A row per (dataset, encoder) holds the mean over seeds and its standard error (``<key>_se``: the
sample standard deviation over seeds / √seeds; None with one seed) and each seed's metrics.

**HSTU against SASRec** (``comparisons``), per dataset, protocol and metric (HR@10, NDCG@10): the
difference of the means, and two standard errors of it:

* ``se_seeds``: √(se_hstu² + se_sasrec²) from the seeds (with two seeds a rough estimate);
* ``se_users``: paired over the test users: each user's metric (hit, or 1/log2(rank + 2) within
  the cut-off) averaged over seeds, HSTU minus SASRec per user, its standard deviation / √users
  (the users are the sample, as in a paired t-test).

``z_seeds`` and ``z_users`` are the difference over each. The best checkpoint of each run is read
back (:func:`~sterling.train.sequence_checkpoint.load_sequence_checkpoint`; with ``holdout = 1``
it is the last model) to rank the test users one by one; its metrics equal the run's report
(checked). A run whose folder under ``--workdir``
already holds a finished run of the same configuration and data is read back, not trained again:
runs can be split over processes (``--seeds 0`` and ``--seeds 1`` side by side, one thread each)
and the table assembled by a last invocation over all of them.

Example::

    sterling bench quality --json runs/quality.json            # ML-100K + ML-1M subset, 2 seeds
    sterling bench quality --quick                             # synthetic smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from sterling.bench.ann import DEFAULT_MOVIELENS, machine
from sterling.bench.report import Benchmark, comma_list, mean_se, write_json
from sterling.train.progress import set_threads
from sterling.train.retrieval import (
    UNSEEN,
    EvalSet,
    RetrievalConfig,
    leave_last_out,
    load_catalog_timelines,
    protocol_ranks,
    ranking_metrics,
    train_retrieval,
)
from sterling.train.sequence_checkpoint import load_sequence_checkpoint
from sterling.train.sequence_model import LR_DECAYS
from sterling.train.sequence_split import TRAIN_EVENTS

__all__ = ["PUBLISHED", "QualityBenchConfig", "format_table", "run"]

ENCODERS = ("hstu", "sasrec")
#: The metrics HSTU and SASRec are compared on.
COMPARED = ("hr@10", "ndcg@10")

#: Published references, with their protocols (printed beside the measured rows).
PUBLISHED = (
    {
        "source": "generative-recommenders README (Zhai et al. 2024), spec roo.md §7.2; HSTU 2 layers x 1 head, "
        "HSTU-large 8 layers x 2 heads of 25, both D = 50",
        "dataset": "ML-1M (all 6,040 users)",
        "protocol": "leave-one-out (train on all but the last), full corpus, the history window (latest 200) "
        "excluded (research/data/eval.py filter_invalid_ids=True)",
        "rows": {
            "sasrec": {"hr@10": 0.2853, "ndcg@10": 0.1603},
            "hstu": {"hr@10": 0.3097, "ndcg@10": 0.1720},
            "hstu-large": {"hr@10": 0.3294, "ndcg@10": 0.1893},
        },
    },
    {
        "source": "generative-recommenders README, quoting BERT4Rec / GRU4Rec from another paper",
        "dataset": "ML-1M (all 6,040 users)",
        "protocol": "leave-one-out, full corpus",
        "rows": {"bert4rec": {"hr@10": 0.2843, "ndcg@10": 0.1537}, "gru4rec": {"hr@10": 0.2811, "ndcg@10": 0.1648}},
    },
)


@dataclass(frozen=True)
class QualityBenchConfig:
    """The runs of the table.

    Args:
        datasets (tuple[str, ...]): MovieLens folders under the ``--movielens`` root.
        encoders (tuple[str, ...]): the user towers compared.
        seeds (tuple[int, ...]): one run per seed and encoder.
        sequence (RetrievalConfig): every run's configuration (encoder and seed replaced).
    """

    datasets: tuple[str, ...] = ("ml-100k", "ml-1m-subset")
    encoders: tuple[str, ...] = ENCODERS
    seeds: tuple[int, ...] = (0, 1)
    sequence: RetrievalConfig = field(
        default_factory=lambda: RetrievalConfig(
            epochs=30,
            lr=4e-3,
            warmup_steps=100,
            lr_decay="cosine",
            holdout=1,
            cutoffs=(5, 10, 20, 50),
            exclude_seen=True,
        )
    )

    def __post_init__(self) -> None:
        if not self.seeds or not self.encoders or not self.datasets:
            raise ValueError("datasets, encoders and seeds must be non-empty")
        unknown = set(self.encoders) - set(ENCODERS)
        if unknown:
            raise ValueError(f"unknown encoders {sorted(unknown)}; known: {ENCODERS}")

    @classmethod
    def quick(cls) -> QualityBenchConfig:
        """A synthetic smoke run: two seeds, two epochs of a small model."""
        small = replace(cls().sequence, dim=16, num_layers=1, max_len=30, epochs=2, batch_size=32, warmup_steps=2)
        return cls(datasets=("synthetic",), seeds=(0, 1), sequence=small)


def _user_metrics(ranks: torch.Tensor, k: int) -> dict[str, np.ndarray]:
    """Per user, the hit (rank < k) and the NDCG@k (1/log2(rank + 2) within k, else 0)."""
    r = ranks.double().numpy()
    hit = (r < k).astype(np.float64)
    return {f"hr@{k}": hit, f"ndcg@{k}": hit / np.log2(r + 2)}


def _paired(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[float, float | None]:
    """The mean per-user difference of ``a`` over ``b`` (each averaged over seeds) and its
    standard error over users."""
    d = np.mean(a, axis=0) - np.mean(b, axis=0)
    return float(d.mean()), (float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None)


def _trained(data_dir: Path, cfg: RetrievalConfig, out: Path, log) -> dict:
    """The report (as JSON) of ``cfg`` trained into ``out``: read back when ``out`` holds a
    finished run of the same configuration and data (``report.json`` is written last), else
    trained now."""
    done = out / "report.json"
    if done.is_file():
        report = json.loads(done.read_text())
        same = report["config"] == json.loads(json.dumps(asdict(cfg)))
        if same and report["data_dir"] == str(data_dir.resolve()) and (out / "best").is_dir():
            log(f"  {out}: a finished run of this configuration; read back")
            return report
    return train_retrieval(data_dir, cfg, log=log, out_dir=out, json_path=done).to_json()


def _one_run(data_dir: Path, cfg: RetrievalConfig, test: EvalSet, work: Path, log) -> dict:
    """Train one encoder and seed (or read a finished run back); its report's metrics and the test
    users' per-user metrics."""
    out = work / f"{cfg.encoder}-seed{cfg.seed}"
    report = _trained(data_dir, cfg, out, log)
    best = load_sequence_checkpoint(out / "best")
    per_user = {}
    protocols = (False, True)  # full corpus, seen items excluded: each history encoded once
    for exclude, ranks in zip(protocols, protocol_ranks(best.model, test, cfg.eval_chunk, protocols), strict=True):
        ranks = ranks[:, 0]
        metrics = ranking_metrics(ranks, cfg.cutoffs)
        prefix = UNSEEN if exclude else ""
        for key, value in metrics.items():  # the checkpoint is the reported model
            if not math.isclose(value, report["test"][prefix + key], rel_tol=1e-9, abs_tol=1e-12):
                raise RuntimeError(f"{out / 'best'}: test {prefix + key} {value} differs from the run's report")
        per_user |= {prefix + k: v for k, v in _user_metrics(ranks, 10).items()}
    return {
        "seed": cfg.seed,
        **{k: report[k] for k in ("best_epoch", "epochs", "train_s", "valid", "test", "popular_test")},
        "per_user": per_user,
    }


def _dataset(data_dir: Path, name: str, cfg: QualityBenchConfig, work: Path, log) -> tuple[list[dict], list[dict]]:
    """The rows (one per encoder) and the HSTU-vs-SASRec comparisons of one dataset."""
    timelines, _ = load_catalog_timelines(data_dir)  # the test users, the same for every run
    seq = cfg.sequence
    test = leave_last_out(timelines.offsets, timelines.item_rows, timelines.ts, seq.max_len, ties=seq.tie_order).test
    runs = {}
    for encoder in cfg.encoders:
        runs[encoder] = []
        for seed in cfg.seeds:
            log(f"{name}: {encoder}, seed {seed}")
            run_cfg = replace(cfg.sequence, encoder=encoder, seed=seed)
            runs[encoder].append(_one_run(data_dir, run_cfg, test, work / name, log))
    rows = []
    for encoder, per_seed in runs.items():
        row = {"dataset": name, "model": encoder, "seeds": list(cfg.seeds)}
        for key in per_seed[0]["test"]:
            row[key], row[f"{key}_se"] = mean_se([s["test"][key] for s in per_seed])
        row["best_epochs"] = [s["best_epoch"] for s in per_seed]
        row["train_s"] = float(np.mean([s["train_s"] for s in per_seed]))
        row["per_seed"] = [{k: v for k, v in s.items() if k != "per_user"} for s in per_seed]
        rows.append(row)
    popular = runs[cfg.encoders[0]][0]["popular_test"]
    rows.append({"dataset": name, "model": "most_popular", "seeds": None, **popular})
    comparisons = []
    if {"hstu", "sasrec"} <= set(runs):
        by = {r["model"]: r for r in rows}
        for prefix in ("", UNSEEN):
            for metric in COMPARED:
                key = prefix + metric
                h, s = by["hstu"], by["sasrec"]
                diff = h[key] - s[key]
                se_seeds = math.hypot(h[f"{key}_se"], s[f"{key}_se"]) if h[f"{key}_se"] is not None else None
                paired, se_users = _paired(
                    [r["per_user"][key] for r in runs["hstu"]], [r["per_user"][key] for r in runs["sasrec"]]
                )
                comparisons.append(
                    {
                        "dataset": name,
                        "metric": key,
                        "hstu": h[key],
                        "sasrec": s[key],
                        "diff": diff,
                        "se_seeds": se_seeds,
                        "z_seeds": diff / se_seeds if se_seeds else None,
                        "paired_diff": paired,
                        "se_users": se_users,
                        "z_users": paired / se_users if se_users else None,
                    }
                )
    return rows, comparisons


def _converted(src: Path, data_dir: Path) -> Path:
    """``src`` (MovieLens) converted into ``data_dir`` once: written beside it and renamed into
    place, so processes sharing a work folder never read a half-written dataset."""
    from sterling.data.movielens import load_movielens

    if not data_dir.is_dir():
        tmp = load_movielens(src, data_dir.with_name(f".{data_dir.name}-{os.getpid()}"))
        try:
            tmp.rename(data_dir)
        except OSError:  # another process put it in place first
            shutil.rmtree(tmp)
    return data_dir


def _synthetic(work: Path) -> Path:
    from sterling.data.synth import SynthConfig, generate

    return generate(SynthConfig(num_users=120, num_items=200, seed=0), work / "synthetic-data")


def run(cfg: QualityBenchConfig, movielens_root: Path | None, work: Path, log=print) -> dict:
    """Every dataset of ``cfg`` found under ``movielens_root`` (``"synthetic"``: a small synthetic
    set); returns ``{"machine", "config", "rows", "comparisons", "published", "skipped"}``."""
    rows, comparisons, skipped = [], [], []
    t0 = time.perf_counter()
    for name in cfg.datasets:
        if name == "synthetic":
            data_dir = _synthetic(work)
        else:
            src = None if movielens_root is None else movielens_root / name
            if src is None or not src.is_dir():
                skipped.append({"dataset": name, "reason": f"not found under {movielens_root}"})
                log(f"{name}: not found under {movielens_root}; skipped")
                continue
            data_dir = _converted(src, work / f"{name}-data")
        r, c = _dataset(data_dir, name, cfg, work, log)
        rows += r
        comparisons += c
    return {
        "machine": machine(),
        "config": {**asdict(cfg), "sequence": asdict(cfg.sequence)},
        "rows": rows,
        "comparisons": comparisons,
        "published": list(PUBLISHED),
        "skipped": skipped,
        "total_s": time.perf_counter() - t0,
    }


def _cell(row: dict, key: str) -> str:
    value, se = row.get(key), row.get(f"{key}_se")
    if value is None:
        return "–"
    return f"{value:.4f}" + (f" ± {se:.4f}" if se is not None else "")


def format_table(result: dict) -> str:
    """The measured rows (history kept, then seen excluded), the comparisons and the references."""
    keys = ("hr@10", "ndcg@10", "hr@20", "ndcg@20")
    lines = []
    titles = ("full corpus, history not excluded", "seen items excluded (GR's evaluation code)")
    for title, prefix in zip(titles, ("", UNSEEN), strict=True):
        lines.append(f"{title}: mean ± s.e. over seeds")
        lines.append(f"  {'dataset':<14}{'model':<14}" + "".join(f"{k.upper():>20}" for k in keys))
        for row in result["rows"]:
            cells = "".join(f"{_cell(row, prefix + k):>20}" for k in keys)
            lines.append(f"  {row['dataset']:<14}{row['model']:<14}{cells}")
    if result["comparisons"]:
        lines.append("HSTU − SASRec: difference, z over seeds, z over users (paired)")
        for c in result["comparisons"]:
            z_seeds = "–" if c["z_seeds"] is None else f"{c['z_seeds']:.1f}"
            z_users = "–" if c["z_users"] is None else f"{c['z_users']:.1f}"
            lines.append(f"  {c['dataset']:<14}{c['metric']:<18}{c['diff']:>+9.4f}   z {z_seeds:>5}   z {z_users:>5}")
    lines.append("published (other protocols and data; see docs/benchmarks.md)")
    for ref in result["published"]:
        for model, m in ref["rows"].items():
            lines.append(f"  {ref['dataset']:<26}{model:<12}HR@10 {m['hr@10']:.4f}  NDCG@10 {m['ndcg@10']:.4f}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a small synthetic run (smoke test, ~30 s)")
    p.add_argument(
        "--movielens",
        default=str(DEFAULT_MOVIELENS.parent),
        metavar="DIR",
        help="the folder holding ml-100k/ and ml-1m-subset/ (default: %(default)s)",
    )
    p.add_argument("--datasets", metavar="LIST", help="MovieLens folders to run (default: ml-100k,ml-1m-subset)")
    p.add_argument("--encoders", metavar="LIST", help="user towers to run (default: hstu,sasrec)")
    p.add_argument("--seeds", metavar="LIST", help="seeds per encoder (default: 0,1)")
    p.add_argument("--epochs", type=int, metavar="N", help="epochs per run (default: 30)")
    p.add_argument("--layers", type=int, metavar="N", help="encoder layers of both models (default: 2)")
    p.add_argument("--heads", type=int, metavar="N", help="attention heads of both models (default: 1)")
    p.add_argument(
        "--train-events",
        choices=TRAIN_EVENTS,
        help="trained events of a timeline: latest (its most recent 200, GR's; default) or all (earlier windows too)",
    )
    p.add_argument("--lr", type=float, help="peak learning rate (default: 4e-3)")
    p.add_argument("--warmup-steps", type=int, metavar="N", help="linear warm-up steps (default: 100)")
    p.add_argument("--lr-decay", choices=LR_DECAYS, help="after the warm-up (default: cosine, to 0 at the last step)")
    p.add_argument(
        "--holdout",
        type=int,
        choices=(1, 2),
        help="events kept out of training: 1, GR's (the test target; the last epoch is reported; default) or 2 "
        "(validation too: the best validation epoch is reported)",
    )
    p.add_argument(
        "--patience",
        type=int,
        metavar="N",
        help="with --holdout 2: stop a run after N epochs without a better validation",
    )
    p.add_argument("--threads", type=int, metavar="N", help="torch threads (default: the CPUs this process may use)")
    p.add_argument(
        "--workdir",
        metavar="DIR",
        help="where data and checkpoints go; finished runs found there are read back (default: a temporary folder)",
    )
    p.add_argument("--json", metavar="PATH", help="write the result as JSON")


def cli(args: argparse.Namespace) -> int:
    cfg = QualityBenchConfig.quick() if args.quick else QualityBenchConfig()
    options = {"epochs": "epochs", "num_layers": "layers", "num_heads": "heads", "train_events": "train_events"}
    options |= {"lr": "lr", "warmup_steps": "warmup_steps"}
    options |= {"lr_decay": "lr_decay", "holdout": "holdout", "patience": "patience"}
    given = {field: getattr(args, arg) for field, arg in options.items() if getattr(args, arg) is not None}
    sequence = replace(cfg.sequence, **given)
    changes: dict = {"sequence": sequence}
    if args.encoders:
        changes["encoders"] = comma_list(args.encoders, "--encoders")
    if args.seeds:
        changes["seeds"] = comma_list(args.seeds, "--seeds", int)
    if args.datasets:
        changes["datasets"] = comma_list(args.datasets, "--datasets")
    cfg = replace(cfg, **changes)
    set_threads(args.threads)
    root = None if args.movielens in (None, "none") else Path(args.movielens)
    with tempfile.TemporaryDirectory(prefix="sterling-quality-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        result = run(cfg, root, work)
    print(format_table(result))
    write_json(args.json, result)
    return 0


BENCHMARK = Benchmark(
    "quality",
    "HSTU vs SASRec next-item quality (HR@k / NDCG@k, two protocols, seeds), published references beside",
    add_arguments,
    cli,
)
