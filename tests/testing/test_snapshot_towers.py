"""The synthetic served snapshot with a sequence user tower (HSTU / SASRec), with and without the
request-level ranker: what it serves, that the request mix is answered, and that it is seeded."""

import pytest
import torch

from sterling.data.synth import DEMO_VALUE
from sterling.models.sequence_tower import SequenceUserTower
from sterling.retrieval.publish import NEXT_TASK, load_model
from sterling.retrieval.rank import Trace
from sterling.snapshot import read_snapshot
from sterling.testing.snapshots import build_serving_snapshot, request_mix

N = 800


@pytest.mark.parametrize("tower", ["hstu", "sasrec"])
@pytest.mark.parametrize("ranker", [False, True], ids=["next", "ranker"])
def test_a_sequence_tower_snapshot_serves_the_request_mix(tmp_path, tower, ranker):
    model = load_model(build_serving_snapshot(tmp_path / "s", num_items=N, seed=2, k0=50, tower=tower, ranker=ranker))
    assert isinstance(model.user_tower, SequenceUserTower) and model.user_tower.cfg.encoder == tower
    assert model.config.features == () and model.config.max_history == 100 and model.overarch is None
    assert model.config.query_tasks == (NEXT_TASK,)
    if ranker:
        assert model.ranker is not None and model.ranker.cfg.encoder == tower
        assert model.config.tasks == ("click", "like", "share") and model.config.value_formula == DEMO_VALUE
    else:
        assert model.ranker is None and model.config.tasks == (NEXT_TASK,) and model.config.value_formula is None
    mix = request_mix(model, 30, seed=1)
    trace = Trace()
    out = model(model.inputs([r["history"] for r in mix]), filter=[r["filter"] for r in mix], k=10, trace=trace)
    assert (out.ids >= 0).sum() > 0.8 * 30 * 10 and out.task_scores.shape[-1] == len(model.config.tasks)
    assert {"user_tower", "ann", "ranker" if ranker else "overarch", "value_model"} == set(trace.seconds)


def test_equal_arguments_write_equal_tensors_and_the_model_seed_alone_changes_weights(tmp_path):
    def parts(name, **kw):
        snap = read_snapshot(
            build_serving_snapshot(tmp_path / name, num_items=N, seed=4, tower="hstu", ranker=True, **kw)
        )
        return snap.tensors

    a, b, c = parts("a"), parts("b"), parts("c", model_seed=9)
    for group in a:
        for key, tensor in a[group].items():
            assert torch.equal(tensor, b[group][key]), (group, key)
    assert torch.equal(a["index"]["ids"], c["index"]["ids"])
    assert not torch.equal(a["model"]["ranker.head.0.weight"], c["model"]["ranker.head.0.weight"])


def test_the_ranker_follows_a_sequence_tower_only(tmp_path):
    with pytest.raises(ValueError, match="sequence tower"):
        build_serving_snapshot(tmp_path / "x", num_items=N, ranker=True)
    with pytest.raises(ValueError, match="tower must be one of"):
        build_serving_snapshot(tmp_path / "y", num_items=N, tower="bert")
