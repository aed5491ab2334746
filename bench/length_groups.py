"""One retrieval training step's encoder (forward + backward, 128 users), the whole batch padded to
its longest sequence against groups of 16 sequences of similar length (``LENGTH_GROUP``), on the
ML-1M subset's sequence lengths (each user's latest 200 events). Same model, same batches, one run.

Usage: python bench/length_groups.py [--ratings PATH] [--json runs/length_groups.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import sterling.train.sequence_model as sequence_model
from sterling.train.retrieval import RetrievalConfig

WHOLE_BATCH = 1 << 30


def step_seconds(model: torch.nn.Module, batches: list[np.ndarray], num_items: int) -> float:
    """Mean seconds of the encoder's forward + backward over ``batches`` (sequence lengths each)."""
    times = []
    for lengths in batches:
        offsets = torch.tensor([0, *np.cumsum(lengths)])
        n = int(offsets[-1])
        items, ts = torch.randint(num_items, (n,)), torch.arange(n)
        t0 = time.perf_counter()
        model(items, ts, offsets, None).sum().backward()
        times.append(time.perf_counter() - t0)
    return float(np.mean(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratings", default="/work/shared/data/ml-1m-subset/ratings.dat.gz")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    counts = Counter(line.split(b"::")[0] for line in gzip.open(args.ratings))
    lengths = np.minimum(np.array(list(counts.values())), 200)
    rng = np.random.default_rng(0)
    rows = []
    print("| layers | whole batch | groups of 16 | speed-up |\n|---|---|---|---|")
    for layers in (2, 4, 8):
        torch.manual_seed(0)
        model = sequence_model.SequenceRetriever(3883, RetrievalConfig(dim=50, num_layers=layers))
        batches = [rng.choice(lengths, 128) for _ in range(3)]
        row = {"layers": layers}
        for name, group in (("whole_batch_s", WHOLE_BATCH), ("groups_s", 16)):
            sequence_model.LENGTH_GROUP = group
            row[name] = step_seconds(model, batches, 3883)
        rows.append(row)
        speedup = row["whole_batch_s"] / row["groups_s"]
        print(f"| {layers} | {row['whole_batch_s']:.2f} s | {row['groups_s']:.2f} s | {speedup:.1f}x |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": 1, "batch": 128, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
