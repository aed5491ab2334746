"""The request-level ranker as a served stage: the served model's per-task scores are the ranker's
for each candidate alone after the history (target-aware), times the retriever's softmax over the
request's candidates when the snapshot has a retrieval temperature; its order is theirs, and
``/v1/rank``'s entry point agrees."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from sterling.index.item_index import IndexConfig
from sterling.models.ranker import RankerConfig, SequenceRanker
from sterling.models.sequence_tower import SequenceTowerConfig, SequenceUserTower
from sterling.models.towers import TaskQueries
from sterling.retrieval.config import ServingConfig
from sterling.retrieval.publish import NEXT_TASK, load_model, write_model_snapshot

N, D, DR, TASKS = 200, 16, 12, ("click", "like")


@pytest.fixture(scope="module", params=[None, 0.05], ids=["ranker", "ranker_x_prior"])
def served(request, tmp_path_factory):
    torch.manual_seed(0)
    tower = SequenceUserTower(SequenceTowerConfig("hstu", D, 1, 1, 20)).eval()
    ranker = SequenceRanker(RankerConfig(num_items=N, tasks=TASKS, dim=DR, num_layers=2, num_heads=2, dropout=0.0))
    with torch.no_grad():
        ranker.items.weight.normal_()  # distinct items
    ranker.eval()
    item_ids = np.arange(N, dtype=np.int64) * 3 + 1
    # k0 = 100: every item of the filter "kind:x" is a candidate (the prior's reference is exact)
    serving = ServingConfig(
        tasks=TASKS,
        k0=30 if request.param is None else 100,
        max_history=20,
        queries=(NEXT_TASK,),
        value_formula="click + like",
        retrieval_temperature=request.param,
    )
    embeddings = torch.randn(N, D)
    path = write_model_snapshot(
        tmp_path_factory.mktemp("ranker") / "snap",
        tower.cfg,
        tower,
        TaskQueries(D, 1),
        None,
        item_ids,
        [{"kind": ("x", "y")[i % 2]} for i in range(N)],
        embeddings,
        serving,
        IndexConfig(nlist=4, nprobe=4),
        ranker=ranker,
    )
    return ranker, item_ids, path, embeddings


def alone(ranker: SequenceRanker, history_rows: list[int], ts: list[int], candidate_row: int) -> torch.Tensor:
    """The ranker's probabilities [T] of one candidate after the history (fp16-cached embeddings)."""
    table = ranker.items.weight.detach().half().float()
    n = len(history_rows)
    return torch.sigmoid(
        ranker.score_candidates(
            table[history_rows],
            torch.ones(n, dtype=torch.int64),
            torch.tensor([0, n]),
            torch.tensor(ts, dtype=torch.int64),
            table[[candidate_row]],
            torch.tensor([0, 1]),
            torch.tensor([ts[-1] if ts else 0]),
        )[0]
    )


def prior(model, inputs, embeddings: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """float ``[B, len(rows)]``: the softmax over ``rows`` of each request's next query's cosine with
    the fp16-cached embeddings, over the snapshot's retrieval temperature (1 without one)."""
    t = model.config.retrieval_temperature
    if t is None:
        return torch.ones(inputs.batch_size, len(rows))
    _, queries = model.encode(inputs)
    vectors = torch.nn.functional.normalize(embeddings[rows].half().float(), dim=-1)
    return torch.softmax(queries[:, 0] @ vectors.T / t, -1)


def test_the_ranker_scores_every_candidate_as_if_alone_and_orders_the_answer(served):
    ranker, item_ids, path, embeddings = served
    model = load_model(path)
    assert model.ranker is not None and model.overarch is None
    rng = np.random.default_rng(0)
    histories = [rng.choice(N, n, replace=False).tolist() for n in (5, 1, 12)]
    stamps = [sorted(rng.integers(0, 10**6, len(h)).tolist()) for h in histories]
    inputs = model.inputs([[int(item_ids[r]) for r in h] for h in histories])
    inputs = replace(inputs, history_ts=torch.tensor([t for s in stamps for t in s]))
    out = model(inputs, filter="kind:x", k=8)
    row_of = {int(i): r for r, i in enumerate(item_ids)}
    kind_x = list(range(0, N, 2))
    engage = prior(model, inputs, embeddings, kind_x)  # [B, N/2]
    for b, (h, s) in enumerate(zip(histories, stamps)):
        ids = [i for i in out.ids[b].tolist() if i >= 0]
        assert len(ids) == 8 and all(row_of[i] % 2 == 0 for i in ids)
        p = engage[b, [row_of[i] // 2 for i in ids]]  # [k]
        want = torch.stack([alone(ranker, h, s, row_of[i]) for i in ids]) * p[:, None]  # [k, T]
        torch.testing.assert_close(out.task_scores[b, : len(ids)], want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.scores[b, : len(ids)], want.sum(1), rtol=1e-4, atol=1e-5)
        assert (out.scores[b].diff() <= 0).all()
    every = torch.from_numpy(item_ids[kind_x]).expand(inputs.batch_size, -1)  # /v1/rank of all K0 candidates
    ranked = model.rank(inputs, every)
    for b in range(inputs.batch_size):
        at = [row_of[i] // 2 for i in out.ids[b].tolist()]
        torch.testing.assert_close(ranked[b, at], out.task_scores[b], rtol=1e-4, atol=1e-7)


def test_the_ranker_stage_can_be_turned_off_only_where_scores_remain(served):
    _, _, path, _ = served
    with pytest.raises(ValueError, match="without an OverArch or a ranker"):
        load_model(path, use_ranker=False)


def test_publish_composes_a_trained_retriever_and_a_trained_ranker(tmp_path):
    """train --model hstu --out, train --ranker --out, publish --ranker: the served tasks are the
    ranker's, the index is queried once (next), and an answer's scores are the ranker's."""
    from sterling.cli import main
    from sterling.data.synth import SynthConfig, generate

    data = generate(
        SynthConfig(num_users=60, num_items=80, history_length=(5, 15), requests_per_user=(1, 3), seed=2),
        tmp_path / "synth",
    )
    common = ["--data", str(data), "--epochs", "1", "--dim", "8", "--layers", "1", "--max-steps", "2"]
    assert main(["train", "--model", "hstu", *common, "--out", str(tmp_path / "hstu")]) == 0
    assert main(["train", "--ranker", *common, "--out", str(tmp_path / "ranker")]) == 0
    snap = tmp_path / "snap"
    argv = ["publish", "--checkpoint", str(tmp_path / "hstu" / "best"), "--data", str(data), "--out", str(snap)]
    assert main([*argv, "--ranker", str(tmp_path / "ranker"), "--k0", "20"]) == 0
    model = load_model(snap)
    assert model.ranker is not None and model.config.query_tasks == (NEXT_TASK,)
    assert model.config.tasks == model.ranker.cfg.tasks and len(model.config.tasks) >= 2
    history = model.index.ids[:4].tolist()
    out = model.recommend(history, k=5, exclude_seen=True)
    assert (out.ids >= 0).sum() == 5 and not set(out.ids[0].tolist()) & set(history)
    assert out.task_scores.shape == (1, 5, len(model.config.tasks))
    assert ((out.task_scores > 0) & (out.task_scores < 1)).all()  # probabilities
