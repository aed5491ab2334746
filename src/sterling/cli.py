"""The ``sterling`` command.

Sub-commands::

    sterling demo                                   synth → train → publish → filtered queries
    sterling data synth --out DIR                   synthetic request-level logs
    sterling data movielens SRC --out DIR           MovieLens (100K / 1M / latest-small) → request rows
    sterling data interactions LOG --out DIR [--format text|pairs|csv|parquet] [--items FILE]   any interaction log → request rows
    sterling data convert SRC OUT [--order time]    request rows ⇄ impression rows (lossless, streaming)
    sterling data stats DIR [--json]                sizes of both formats
    sterling train --data DIR --out CKPT [--nproc N]   two-tower + OverArch on request batches (DDP), held-out recall
    sterling train --model hstu|sasrec --data DIR [--out CKPT] [--patience N] [--multi-task]
                   [--loss auto|full|sampled] [--warmup-steps N] [--lr-decay cosine] [--holdout 1|2]
                   [--query-time request|event] [--tie-order shuffled|stored] [--train-events latest|all]
                   [--cutoffs 5,10,20]
                   [--exclude-seen] [--threads N]
                                                    next-item retrieval, leave-last-out HR@k / NDCG@k
    sterling train --ranker --data DIR [--out CKPT] [--encoder hstu|sasrec]   request-level ranker (ROO), held-out AUC / NE / GAUC
    sterling publish --checkpoint CKPT --data DIR --out SNAP [--value FORMULA] [--export]
    sterling query --snapshot SNAP --user ID [--filter EXPR] [-k 10] [--json]
    sterling serve --snapshot SNAP [--port 8000] [--users PATH] [--log PATH | --no-log] [--engine ray --shards N --replicas R]   HTTP server
    sterling snapshot compact --snapshot SNAP [--log PATH] [--out DIR]   fold the update log into a new snapshot
    sterling bench ann [--quick] [--json PATH] [--plot PATH]   filtered search vs FAISS / hnswlib
    sterling bench roo [--quick] [--json PATH]      ROO vs impression-level training
    sterling bench retrieval [--quick] [--json PATH]   recall@K / QPS: exact, int8+Bloom, +OverArch, +VM
    sterling bench quality [--quick] [--seeds 0,1] [--workdir DIR] [--json PATH]   HSTU vs SASRec, MovieLens
    sterling bench serve [--quick] [--towers two_tower,hstu,hstu+ranker] [--json PATH]
                                                    the HTTP server under load: batched, unbatched, swap + updates
    sterling bench shards [--quick] [--json PATH]   Ray Serve item shards (1 vs 2) beside the single-process server
    sterling bench stack [--quick] [--json PATH] [--plot PATH]   one model vs front + filter + FAISS ANN + ranking services

Errors in the input (a malformed filter, a corrupt snapshot, a missing file) print one line naming
the problem and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa

from sterling.bench.report import Benchmark, comma_list

__all__ = ["main"]


def _cmd_synth(args: argparse.Namespace) -> None:
    from sterling.data.synth import SynthConfig, generate

    cfg = SynthConfig(seed=args.seed)
    cfg = replace(cfg, **{k: v for k, v in (("num_users", args.users), ("num_items", args.items)) if v})
    t0 = time.perf_counter()
    out = generate(cfg, Path(args.out))
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")


def _cmd_movielens(args: argparse.Namespace) -> None:
    from sterling.data.movielens import load_movielens

    kwargs = {"window_s": args.window_s} if args.window_s is not None else {}
    print(f"wrote {load_movielens(Path(args.src), Path(args.out), **kwargs)}")


def _names(values: list[str] | None) -> tuple[str, ...]:
    """Column names given as repeated options and/or comma lists."""
    return tuple(name.strip() for value in values or () for name in value.split(",") if name.strip())


def _cmd_interactions(args: argparse.Namespace) -> None:
    from sterling.data.interactions import InteractionOptions, load_interactions

    options = InteractionOptions(
        format=args.format,
        user_col=args.user_col,
        item_col=args.item_col,
        ts_col=args.ts_col,
        label_cols=_names(args.label_col),
        feature_cols=_names(args.feature_col),
        items_path=Path(args.items) if args.items else None,
        display_cols=_names(args.display_col),
        **({"window_s": args.window_s} if args.window_s is not None else {}),
    )
    print(f"wrote {load_interactions(Path(args.src), Path(args.out), options)}")


def _cmd_convert(args: argparse.Namespace) -> None:
    from sterling.data.group import impressions_to_requests, requests_to_impressions
    from sterling.data.schema import DatasetPaths

    src = DatasetPaths(Path(args.src))
    if src.format == "requests":
        requests_to_impressions(Path(args.src), Path(args.out), order=args.order)
    else:
        impressions_to_requests(Path(args.src), Path(args.out))
    print(f"converted {src.format} rows in {args.src} → {args.out}")


def _cmd_stats(args: argparse.Namespace) -> None:
    from sterling.data.stats import dataset_stats, format_stats

    stats = dataset_stats(Path(args.dir))
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))


RETRIEVAL_MODELS = ("hstu", "sasrec")
_SEQUENCE_ONLY = ("max_len", "layers", "heads", "lr", "dropout")  # --model hstu|sasrec or --ranker
_RETRIEVAL_ONLY = (
    "eval_every",
    "patience",
    "multi_task",
    "loss",
    "negatives",
    "warmup_steps",
    "lr_decay",
    "holdout",
    "query_time",
    "tie_order",
    "train_events",
    "cutoffs",
    "exclude_seen",
)
_RANKER_ONLY = ("encoder", "token_budget", "max_impressions")


def _flags(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    """The options of ``names`` given on the command line, as flags (``--max-len``)."""
    return [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is not None]


def _cmd_train(args: argparse.Namespace) -> None:
    from sterling.train.progress import set_threads

    set_threads(args.threads)
    if args.ranker:
        _train_ranker(args)
        return
    ranker_only = _flags(args, _RANKER_ONLY)
    if ranker_only:
        raise ValueError(f"{', '.join(ranker_only)}: only with --ranker")
    if args.model in RETRIEVAL_MODELS:
        _train_retrieval(args)
        return
    sequence_only = _flags(args, _SEQUENCE_ONLY)
    if sequence_only:
        raise ValueError(f"{', '.join(sequence_only)}: only with --model hstu or sasrec, or --ranker")
    given = _flags(args, _RETRIEVAL_ONLY)
    if given:
        raise ValueError(f"{', '.join(given)}: only with --model hstu or sasrec")
    if args.out is None:
        raise ValueError("--out (the checkpoint directory) is required with --model two-tower")
    from sterling.train.loop import TrainConfig, train

    cfg = TrainConfig(
        epochs=5 if args.epochs is None else args.epochs,
        max_steps=args.max_steps,
        dim=64 if args.dim is None else args.dim,
        seed=args.seed,
    )
    log = _log_to_stderr if args.json == "-" else print
    if args.nproc != 1:
        from sterling.train.loop import train_distributed

        report = train_distributed(Path(args.data), Path(args.out), cfg, args.nproc, log=log)
    else:
        report = train(Path(args.data), Path(args.out), cfg, log=log)
    result = {
        "checkpoint": str(report.checkpoint),
        "steps": report.steps,
        "train_s": report.train_s,
        "impressions_per_s": report.impressions_per_s,
        "metrics": report.metrics,
    }
    if args.json == "-":
        print(json.dumps(result, indent=2))
        return
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"checkpoint: {report.checkpoint}")


def _log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _log(message: str) -> None:
    """A progress line on stdout, flushed (it shows in a log file as it happens)."""
    print(message, flush=True)


def _nan_to_none(value):
    """``value`` (JSON-like) with every NaN float replaced by None, so it is strict JSON."""
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return None if isinstance(value, float) and value != value else value


def _train_ranker(args: argparse.Namespace) -> None:
    """``train --ranker``: the request-level ranker, ROO mode (sterling.train.ranking)."""
    from dataclasses import asdict

    from sterling.train.ranking import RankingConfig, train_ranker

    if args.model is not None:
        raise ValueError(
            f"--ranker trains the request-level ranker; --model {args.model} picks another model "
            "(its user tower is chosen with --encoder hstu|sasrec)"
        )
    if args.nproc != 1:
        raise ValueError("--nproc: data-parallel training is for --model two-tower")
    retrieval_only = _flags(args, _RETRIEVAL_ONLY)
    if retrieval_only:
        raise ValueError(f"{', '.join(retrieval_only)}: only with --model hstu or sasrec")
    given = {
        "encoder": args.encoder,
        "epochs": args.epochs,
        "dim": args.dim,
        "num_layers": args.layers,
        "num_heads": args.heads,
        "max_history": args.max_len,
        "lr": args.lr,
        "dropout": args.dropout,
        "token_budget": args.token_budget,
        "max_impressions": args.max_impressions,
        "max_steps": args.max_steps,
    }
    cfg = RankingConfig(mode="roo", seed=args.seed, **{k: v for k, v in given.items() if v is not None})
    if cfg.dim % cfg.num_heads:
        raise ValueError(f"--dim {cfg.dim} is not a multiple of --heads {cfg.num_heads}")
    to_stdout = args.json == "-"
    log = _log_to_stderr if to_stdout else print
    out = Path(args.out) if args.out is not None else None
    report = train_ranker(Path(args.data), cfg, log=log, out_dir=out)
    result = _nan_to_none(asdict(report))
    if to_stdout:
        print(json.dumps(result, indent=2))
        return
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"ranker ({cfg.encoder}, roo) on {args.data}: {report.requests:,} requests, {report.impressions:,} "
        f"impressions, {report.steps} steps, {report.train_s:.1f}s"
    )
    print(f"  {'held out':<10}{'AUC':>9}{'NE':>9}{'GAUC':>9}")
    for task in report.auc:
        print(f"  {task:<10}" + "".join(f"{getattr(report, m)[task]:>9.4f}" for m in ("auc", "ne", "gauc")))
    print(f"checkpoint: {report.checkpoint}" if report.checkpoint else "checkpoint: none (no --out)")


def _train_retrieval(args: argparse.Namespace) -> None:
    from sterling.train.retrieval import UNSEEN, RetrievalConfig, train_retrieval

    if args.nproc != 1:
        raise ValueError("--nproc: data-parallel training is for --model two-tower")
    given = {
        "epochs": args.epochs,
        "dim": args.dim,
        "max_len": args.max_len,
        "num_layers": args.layers,
        "num_heads": args.heads,
        "lr": args.lr,
        "dropout": args.dropout,
        "eval_every": args.eval_every,
        "patience": args.patience,
        "multi_task": args.multi_task,
        "loss": args.loss,
        "num_negatives": args.negatives,
        "warmup_steps": args.warmup_steps,
        "lr_decay": args.lr_decay,
        "holdout": args.holdout,
        "query_time": args.query_time,
        "tie_order": args.tie_order,
        "train_events": args.train_events,
        "cutoffs": None if args.cutoffs is None else comma_list(args.cutoffs, "--cutoffs", int),
        "exclude_seen": args.exclude_seen,
    }
    cfg = RetrievalConfig(
        encoder=args.model,
        seed=args.seed,
        max_steps=args.max_steps,
        **{k: v for k, v in given.items() if v is not None},
    )
    to_stdout = args.json == "-"
    log = _log_to_stderr if to_stdout else _log
    path = Path(args.json) if args.json and not to_stdout else None
    out = Path(args.out) if args.out is not None else None
    report = train_retrieval(Path(args.data), cfg, log=log, json_path=path, out_dir=out)
    if to_stdout:
        print(json.dumps(report.to_json(), indent=2))
        return
    names = tuple(f"{m}@{k}" for k in cfg.cutoffs for m in ("hr", "ndcg")) + ("mrr",)
    print(
        f"{args.model} on {args.data}: {report.num_users:,} users, {report.num_items:,} items, "
        f"{report.epochs:g} epochs, {report.steps} steps, {report.train_s:.0f}s"
    )
    print(f"  {'':<16}" + "".join(f"{n.upper():>9}" for n in names))
    rows = [(label, m) for label, m in (("valid", report.valid), ("test", report.test)) if m]  # holdout 1: no valid
    if report.best_epoch is not None:
        rows = [(f"{label} (ep {report.best_epoch})", metrics) for label, metrics in rows]
        if report.last_test:
            rows.append(("test (last)", report.last_test))
    if cfg.exclude_seen:
        rows += [(f"{label}, unseen", {n: m[UNSEEN + n] for n in names}) for label, m in rows]
    for label, metrics in (*rows, ("popular (test)", report.popular_test)):
        print(f"  {label:<16}" + "".join(f"{metrics[n]:>9.4f}" for n in names))
    if report.tasks:
        print(f"  {'HR@10 per task':<16}{'query':>9}{'next':>9}   (users whose held-out event has the task)")
        for task in report.tasks:
            for label, metrics in rows:
                nan = float("nan")  # no held-out event of the task
                got, base = metrics.get(f"hr@10:{task}", nan), metrics.get(f"hr@10:{task}(next)", nan)
                print(f"  {task + ' ' + label.split()[0]:<16}{got:>9.4f}{base:>9.4f}")
    if out is not None:
        if report.best_epoch is not None:
            best = f"{out / 'best'} (epoch {report.best_epoch})"
        else:
            best = f"{out / 'best'} (the last model)" if cfg.holdout == 1 else "no best (no epoch ran)"
        print(f"checkpoints: {best}, {out / 'last'}")


def _cmd_publish(args: argparse.Namespace) -> None:
    from sterling.data.schema import DatasetPaths
    from sterling.retrieval.publish import publish

    t0 = time.perf_counter()
    if args.shards is not None and (args.export or args.aot):
        raise ValueError("--shards: a sharded snapshot holds no exported program (drop --export / --aot)")
    with tempfile.TemporaryDirectory(prefix="sterling-publish-") as tmp:
        whole = Path(args.out) if args.shards is None else Path(tmp) / "whole"
        out = publish(
            Path(args.checkpoint),
            DatasetPaths(Path(args.data)).items,
            whole,
            k0=args.k0,
            nprobe=args.nprobe,
            value_formula=args.value,
            use_overarch=not args.no_overarch,
            export=args.export,
            aot=args.aot,
            ranker=None if args.ranker is None else Path(args.ranker),
        )
        if args.shards is not None:
            from sterling.serving.shards import split_snapshot

            out = split_snapshot(whole, Path(args.out), args.shards)
    print(f"published {out} in {time.perf_counter() - t0:.1f}s")


def _cmd_query(args: argparse.Namespace) -> None:
    from sterling.query import format_recommendations
    from sterling.retrieval.publish import load_model

    rec = load_model(Path(args.snapshot))
    print(
        format_recommendations(
            rec, args.user, args.history, args.filter, args.k, args.data, args.json, not args.include_seen
        )
    )


def _cmd_serve(args: argparse.Namespace) -> None:
    import os

    from sterling.serving.batcher import BatcherConfig
    from sterling.serving.compaction import default_log_path
    from sterling.serving.server import ServerConfig, serve
    from sterling.serving.service import Limits

    formulas = []
    for named in args.value or []:
        name, sep, formula = named.partition("=")
        if not sep or not name.strip() or not formula.strip():
            raise ValueError(f"--value takes NAME=FORMULA, got {named!r}")
        formulas.append((name.strip(), formula.strip()))
    users = args.users
    if users is None and args.data is not None:
        users = Path(args.data) / "users.parquet"
    config = ServerConfig(
        snapshot=Path(args.snapshot),
        token=os.environ.get(args.token_env) or None,
        allow_no_auth=args.insecure_no_auth,
        users=None if users is None else Path(users),
        value_formulas=tuple(formulas),
        batcher=BatcherConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue),
        limits=Limits(max_k=args.max_k),
        snapshot_root=None if args.snapshot_root is None else Path(args.snapshot_root),
        update_log=None if args.no_log else Path(args.log or default_log_path(Path(args.snapshot))),
    )
    if args.engine == "ray":
        if args.threads is not None:
            raise ValueError("--threads: only with the local engine (Ray replicas take theirs from Ray's num_cpus)")
        _serve_ray(config, args)
        return
    if args.shards is not None or args.replicas is not None:
        raise ValueError("--shards and --replicas: only with --engine ray")
    if args.threads is not None:
        from sterling.train.progress import set_threads

        set_threads(args.threads)
    serve(config, host=args.host, port=args.port)


def _serve_ray(config, args: argparse.Namespace) -> None:
    """``serve --engine ray``: a sharded snapshot as is, a whole one split into ``--shards`` first."""
    from dataclasses import replace

    from sterling.serving.ray_app import run
    from sterling.serving.shards import SHARDS_FILE, shard_paths, split_snapshot

    snapshot = Path(args.snapshot)
    with tempfile.TemporaryDirectory(prefix="sterling-shards-") as tmp:
        if (snapshot / SHARDS_FILE).is_file():
            count = len(shard_paths(snapshot))
            if args.shards not in (None, count):
                raise ValueError(f"{snapshot} holds {count} shards, not --shards {args.shards}")
        else:
            count = args.shards or 1
            snapshot = split_snapshot(snapshot, Path(tmp), count)
        replicas = args.replicas or 1
        print(
            f"sterling: serving {args.snapshot} as {count} shard(s) × {replicas} replica(s) on Ray Serve, "
            f"http://{args.host}:{args.port} (docs at /docs)",
            file=sys.stderr,
        )
        run(replace(config, snapshot=snapshot), host=args.host, port=args.port, replicas=replicas)


def _cmd_compact(args: argparse.Namespace) -> None:
    from sterling.serving.compaction import compact, compacted_path, default_log_path
    from sterling.serving.update_log import UpdateLog

    snapshot = Path(args.snapshot)
    log_path = Path(args.log or default_log_path(snapshot))
    if not log_path.is_file():
        raise ValueError(f"no update log at {log_path} (--log PATH names it)")
    log = UpdateLog(log_path)
    try:
        through = log.last_seq
        out = Path(args.out) if args.out else compacted_path(snapshot.parent, through)
        compact(snapshot, log, out, through)
    finally:
        log.close()
    print(f"sterling: {out} holds {snapshot} with the updates of {log_path} through seq {through}; the log is trimmed")


def _cmd_demo(args: argparse.Namespace) -> None:
    from sterling.demo import run_demo

    run_demo(Path(args.workdir), quick=args.quick)


def _benchmarks() -> tuple[Benchmark, ...]:
    """The ``sterling bench`` sub-commands, in the order of ``sterling bench --help``."""
    from sterling.bench import ann, quality, retrieval, roo, serve, shards, stack

    return (
        ann.BENCHMARK,
        roo.BENCHMARK,
        retrieval.BENCHMARK,
        quality.BENCHMARK,
        serve.BENCHMARK,
        shards.BENCHMARK,
        stack.BENCHMARK,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sterling", description="Index-as-model retrieval trained on request-level data.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="synthetic data → train → publish → filtered queries")
    d.add_argument("--workdir", default="runs/demo", help="where data, checkpoint and snapshot go")
    d.add_argument("--quick", action="store_true", help="a smaller catalogue and one epoch")
    d.set_defaults(func=_cmd_demo)

    data = sub.add_parser("data", help="request-level data: generate, load, convert, measure")
    dsub = data.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="write a synthetic request-format dataset")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--users", type=int)
    s.add_argument("--items", type=int)
    s.set_defaults(func=_cmd_synth)
    m = dsub.add_parser("movielens", help="MovieLens 100K / 1M / latest-small → request-format dataset")
    m.add_argument("src", help="folder with u.data, ratings.dat[.gz] or ratings.csv")
    m.add_argument("--out", required=True)
    m.add_argument("--window-s", type=int, help="seconds a request spans (see sterling.data.movielens)")
    m.set_defaults(func=_cmd_movielens)
    it = dsub.add_parser(
        "interactions",
        help="any interaction log (CSV, Parquet, or SASRec-style text) → request-format dataset",
        description="With timestamps, a user's interactions are grouped into requests by --window-s; without "
        "them (text logs, or a table with no timestamp column) every interaction is its own request, at the "
        "synthetic ts 0, 1, 2, ... = its position in the user's sequence, so the order is kept. String ids "
        "are mapped to int64 ids 1..N (the mapping: OUT/ids.parquet). See sterling.data.interactions.",
    )
    it.add_argument("src", help="the log: .csv, .parquet, or text lines `user item [item ...]`, oldest first")
    it.add_argument("--out", required=True)
    it.add_argument(
        "--format",
        choices=("text", "pairs", "csv", "parquet"),
        help="default: from the extension (.csv, .parquet; anything else: text); pairs: text, one `user item` a line",
    )
    it.add_argument("--user-col", default="user_id", help="CSV/Parquet user column (default: user_id)")
    it.add_argument("--item-col", default="item_id", help="item column of the log and of --items (default: item_id)")
    it.add_argument("--ts-col", help="unix-seconds timestamp column (default: `timestamp` when present)")
    it.add_argument(
        "--label-col",
        action="append",
        metavar="COLS",
        help="0/1 label column(s), repeatable or comma list (default: one label `click` = 1)",
    )
    it.add_argument("--feature-col", action="append", metavar="COLS", help="impression feature column(s)")
    it.add_argument("--items", help="item attribute table (CSV with |-separated lists, or Parquet)")
    it.add_argument("--display-col", action="append", metavar="COLS", help="--items columns to show, not filter on")
    it.add_argument("--window-s", type=int, help="seconds a request spans, with timestamps (default 600)")
    it.set_defaults(func=_cmd_interactions)
    c = dsub.add_parser("convert", help="request format ⇄ impression format (direction from SRC)")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument(
        "--order",
        choices=("user", "time"),
        default="user",
        help="row order of written impression rows: by (user_id, ts) or by ts, as logged "
        "(impression rows in any order are read)",
    )
    c.set_defaults(func=_cmd_convert)
    st = dsub.add_parser("stats", help="rows, impressions and bytes per impression in both formats")
    st.add_argument("dir")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_stats)

    t = sub.add_parser(
        "train",
        help="train the two-tower model, an HSTU / SASRec next-item retriever, or the request-level ranker",
        description="--model two-tower (default): the two-tower model on request batches, held-out recall, a "
        "checkpoint in --out. --model hstu|sasrec: a next-item retriever on the users' timelines, leave-last-out "
        "split, full-corpus HR@10/NDCG@10/HR@50/NDCG@50 (sterling.train.retrieval). --ranker: the multi-task "
        "sequential ranker trained ROO-style on request rows, held-out AUC/NE/GAUC per task, a ranker checkpoint "
        "in --out (sterling.train.ranking).",
    )
    t.add_argument(
        "--model", choices=("two-tower", *RETRIEVAL_MODELS), help="the retrieval model to train (default: two-tower)"
    )
    t.add_argument(
        "--ranker",
        action="store_true",
        help="train the request-level multi-task ranker instead (ROO: each request's history encoded once)",
    )
    t.add_argument("--data", required=True, metavar="DIR", help="request-format dataset directory")
    t.add_argument(
        "--out",
        metavar="DIR",
        help="checkpoint directory (required with two-tower); hstu|sasrec: writes DIR/best (the best "
        "validation NDCG@10 epoch, validating every epoch) and DIR/last (the last epoch); --ranker: the "
        "trained ranker",
    )
    t.add_argument(
        "--epochs",
        type=int,
        metavar="N",
        help="passes over the training data (default: 5 two-tower, 20 retrieval, 1 ranker)",
    )
    t.add_argument("--max-steps", type=int, metavar="N", help="stop after this many steps (smoke runs)")
    t.add_argument(
        "--dim", type=int, metavar="D", help="embedding width (default: 64 two-tower, 50 retrieval, 64 ranker)"
    )
    t.add_argument("--seed", type=int, default=0, metavar="N")
    t.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch threads (default: the CPUs this process may use, affinity and cgroup quota)",
    )
    t.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="data-parallel processes (torch.distributed DDP: gloo on CPU, nccl on GPU); each takes its "
        "share of every batch's requests (two-tower)",
    )
    t.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="the report as JSON: on stdout (logs to stderr), or written to PATH",
    )
    r = t.add_argument_group(
        "sequence options (--model hstu|sasrec: defaults, GR's ML-1M set-up, in parentheses; --ranker: in brackets)"
    )
    r.add_argument("--max-len", type=int, metavar="N", help="most recent events per sequence (200) [200]")
    r.add_argument("--layers", type=int, metavar="N", help="encoder layers (2) [2]")
    r.add_argument("--heads", type=int, metavar="N", help="attention heads, each dim / heads wide (1) [1]")
    r.add_argument("--lr", type=float, help="Adam learning rate (1e-3) [1e-3]")
    r.add_argument("--dropout", type=float, metavar="P", help="input and encoder dropout (0.2) [0.1]")
    r = t.add_argument_group("retrieval options (--model hstu|sasrec)")
    r.add_argument(
        "--eval-every",
        type=int,
        metavar="N",
        help="validate every N epochs (0: at the end only; every epoch with --out)",
    )
    r.add_argument(
        "--patience",
        type=int,
        metavar="N",
        help="stop after N epochs without a better validation NDCG@10 (validates every epoch; the best epoch is reported)",
    )
    r.add_argument(
        "--multi-task",
        action="store_true",
        default=None,
        help="also train one task query per label of the data (action bit j = label j: click/like/share, "
        "MovieLens like/love) on the next events with that action, beside the next-item query; "
        "reports per-task HR@10",
    )
    r.add_argument(
        "--loss",
        choices=("auto", "full", "sampled"),
        help="full: softmax over the whole catalogue; sampled: in-batch targets + --negatives uniform items, "
        "logQ-corrected; auto (default): full when one step's logits (batch x max-len x items) fit 1 GiB",
    )
    r.add_argument("--negatives", type=int, metavar="N", help="uniform negatives of the sampled softmax (512)")
    r.add_argument("--warmup-steps", type=int, metavar="N", help="linear learning-rate warm-up steps (0)")
    r.add_argument(
        "--lr-decay",
        choices=("constant", "cosine"),
        help="learning rate after the warm-up: constant (default) or cosine decay to 0 at the last planned step",
    )
    r.add_argument(
        "--holdout",
        type=int,
        choices=(1, 2),
        help="events kept out of training per user: 2 (default: validation + test targets) or 1 (GR's: only the "
        "test target; no validation, so no --patience, and the last epoch is reported and written as best)",
    )
    r.add_argument(
        "--query-time",
        choices=("request", "event"),
        help="HSTU's time bias measures a query's gaps from the time of the request it answers (request, default, "
        "GR's: the next event's time; the target's in evaluation) or from its own last event (event)",
    )
    r.add_argument(
        "--tie-order",
        choices=("shuffled", "stored"),
        help="a user's events of the same second, in training and evaluation: shuffled (default: by a fixed hash "
        "of user and item) or stored (by item id, an order a model learns to exploit)",
    )
    r.add_argument(
        "--train-events",
        choices=("latest", "all"),
        help="the events of a timeline trained on: latest (default, GR's: its most recent --max-len) or all (the "
        "earlier ones too, in windows of --max-len, each event a target once)",
    )
    r.add_argument("--cutoffs", metavar="LIST", help="the k of HR@k / NDCG@k, e.g. 5,10,20 (10,50; 10 always)")
    r.add_argument(
        "--exclude-seen",
        action="store_true",
        default=None,
        help="also evaluate with the items the user saw before the target removed from the ranking "
        "(reported beside the full-corpus numbers, which select the best epoch)",
    )
    rk = t.add_argument_group("ranker options (--ranker)")
    rk.add_argument("--encoder", choices=RETRIEVAL_MODELS, help="the ranker's user tower (hstu)")
    rk.add_argument(
        "--token-budget", type=int, metavar="N", help="history events + impressions per step, whole requests (16384)"
    )
    rk.add_argument("--max-impressions", type=int, metavar="N", help="stop after this many training impressions")
    t.set_defaults(func=_cmd_train)

    pub = sub.add_parser("publish", help="checkpoint + items → one snapshot")
    pub.add_argument("--checkpoint", required=True)
    pub.add_argument("--data", required=True, help="dataset directory holding items.parquet")
    pub.add_argument("--out", required=True)
    pub.add_argument("--k0", type=int, default=1000, help="ANN candidates per task query handed to OverArch")
    pub.add_argument("--nprobe", type=int, help="IVF lists probed (default: the index's)")
    pub.add_argument(
        "--value",
        metavar="FORMULA",
        help="Value Model over the task probabilities, e.g. 'click + 0.5*like^0.5' (default: primary task)",
    )
    pub.add_argument("--no-overarch", action="store_true", help="rank the ANN candidates by inner product")
    pub.add_argument(
        "--ranker",
        metavar="CKPT",
        help="a `train --ranker` checkpoint of the same items: the request-level ranker scores the candidates",
    )
    pub.add_argument("--export", action="store_true", help="also write program.pt2, the torch.export forward")
    pub.add_argument(
        "--aot",
        action="store_true",
        help="also write program.aoti.pt2, the forward compiled by AOTInductor (needs a C++ compiler)",
    )
    pub.add_argument(
        "--shards",
        type=int,
        metavar="N",
        help="write N item shards (shard-0 … shard-N-1 + shards.json) for sterling serve --engine ray",
    )
    pub.set_defaults(func=_cmd_publish)

    b = sub.add_parser("bench", help="benchmarks against the named peers, JSON out")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    for bench in _benchmarks():
        bp = bsub.add_parser(bench.name, help=bench.help)
        bench.add_arguments(bp)
        bp.set_defaults(func=bench.run)

    sv = sub.add_parser("serve", help="the published model over HTTP: retrieve, rank, live items, metrics")
    sv.add_argument("--snapshot", required=True)
    sv.add_argument(
        "--snapshot-root",
        metavar="DIR",
        help="/v1/admin/reload loads only snapshots under DIR (default: the parent of --snapshot)",
    )
    durability = sv.add_mutually_exclusive_group()
    durability.add_argument(
        "--log",
        metavar="PATH",
        help="the SQLite update log: /v1/items answers once an update is committed there, and a restart replays it "
        "(default: SNAPSHOT.updates.sqlite beside --snapshot)",
    )
    durability.add_argument(
        "--no-log", action="store_true", help="keep live updates in memory only (lost when the process ends)"
    )
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--users", help="users.parquet, so requests may name a user_id")
    sv.add_argument("--data", help="dataset directory whose users.parquet to use (instead of --users)")
    sv.add_argument(
        "--value",
        action="append",
        metavar="NAME=FORMULA",
        help="a named Value Model formula requests may pick (repeatable)",
    )
    sv.add_argument(
        "--threads", type=int, metavar="N", help="torch threads of the forward (default: torch's, one per core)"
    )
    sv.add_argument("--max-batch", type=int, default=8, help="most requests in one forward (1: no batching)")
    sv.add_argument("--max-wait-ms", type=float, default=2.0, help="longest a request waits for its batch to fill")
    sv.add_argument("--max-queue", type=int, default=4096, help="waiting requests beyond which the server answers 503")
    sv.add_argument("--max-k", type=int, help="most results per request (default: the snapshot's k0)")
    sv.add_argument(
        "--token-env",
        default="STERLING_TOKEN",
        help="environment variable holding the bearer token of the write endpoints",
    )
    sv.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="run the write endpoints (items, admin) without a token: local use only",
    )
    sv.add_argument(
        "--engine",
        choices=("uvicorn", "ray"),
        default="uvicorn",
        help="one process (uvicorn), or item shards on Ray Serve ([ray] extra)",
    )
    sv.add_argument("--shards", type=int, metavar="N", help="item shards (--engine ray; default: the snapshot's, or 1)")
    sv.add_argument("--replicas", type=int, metavar="R", help="replicas per shard (--engine ray; default 1)")
    sv.set_defaults(func=_cmd_serve)

    sn = sub.add_parser("snapshot", help="snapshot maintenance").add_subparsers(dest="snapshot_command", required=True)
    co = sn.add_parser(
        "compact",
        help="fold the update log into a new snapshot (fresh items in their IVF lists, deletes dropped), then trim "
        "the log; for a stopped server (a running one: POST /v1/admin/compact)",
    )
    co.add_argument("--snapshot", required=True, help="the snapshot the server was started on (or serves)")
    co.add_argument("--log", metavar="PATH", help="the update log (default: SNAPSHOT.updates.sqlite)")
    co.add_argument("--out", metavar="DIR", help="the new snapshot (default: compacted-SEQ beside --snapshot)")
    co.set_defaults(func=_cmd_compact)

    q = sub.add_parser("query", help="filtered top-k for one user from a published snapshot")
    q.add_argument("--snapshot", required=True)
    who = q.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", type=int, help="user id; history from the dataset's users.parquet")
    who.add_argument("--history", help="comma-separated item ids, oldest first")
    q.add_argument("--data", help="dataset directory (default: the one the model was trained on)")
    q.add_argument("--filter", help='e.g. "genre:Drama AND NOT year:1995"')
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--json", action="store_true")
    q.add_argument("--include-seen", action="store_true", help="allow items of the user's history in the answer")
    q.set_defaults(func=_cmd_query)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, pa.ArrowInvalid) as e:
        print(f"sterling: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
