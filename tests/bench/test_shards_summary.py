"""The summary arithmetic of ``sterling bench shards`` (the run itself needs Ray and minutes)."""

from sterling.bench.serve import Step
from sterling.bench.shards import _agreement, sustained_qps


def test_sustained_qps_is_the_last_step_that_kept_up():
    steps = [
        Step("m", 10, 10.0, 5, 9, 0, 80),
        Step("m", 20, 19.5, 6, 12, 0, 160),
        Step("m", 30, 24.0, 90, 400, 0, 240),
        Step("m", 40, 39.0, 50, 90, 3, 320),
    ]
    assert sustained_qps(steps) == 19.5  # 24 of 30 fell behind; 39 of 40 had errors
    assert sustained_qps(steps[2:]) == 0.0


def test_agreement_is_the_mean_share_of_the_reference_top_k():
    assert _agreement([[1, 2, 3], [4, 5], [9]], [[1, 2, 7], [5, 4], []]) == (2 / 3 + 1) / 2  # empty answers skipped
