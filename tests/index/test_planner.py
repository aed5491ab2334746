"""The planner: probes grow as a filter gets more selective, scans when that is most lists, gathers
a shared selective filter, and plans nothing for a constant-false one."""

import pytest
import torch

from sterling.index.attributes import AttributeStore
from sterling.index.config import IndexConfig
from sterling.index.planner import plan_batch, probes_for
from sterling.index.segment import Segment

CFG = IndexConfig(nprobe=8, min_candidates=1.0, scan_selectivity=0.001, gather_queries=4, gather_rows=500)


@pytest.mark.parametrize("k", [1, 10, 100])
def test_probes_grow_as_the_share_falls_and_a_scan_caps_them(k):
    shares = [1.0, 0.5, 0.1, 0.01, 0.001, 0.0001]
    probes = [probes_for(s, 8, k, 1_000_000, 1024, CFG) for s in shares]
    assert probes == sorted(probes)
    assert probes[0] >= 8 and all(p <= 1024 for p in probes)
    assert probes[-1] == 1024  # at or below scan_selectivity: a scan
    assert all(p == 1024 or 2 * p < 1024 for p in probes)  # half the lists or more is a scan


def test_plan_batch_gathers_a_shared_selective_filter_only():
    n = 4096
    attrs = AttributeStore.build([{"a": f"v{i % 100}"} for i in range(n)])
    seg = Segment.build(torch.randn(n, 4), attrs, config=IndexConfig(nlist=64, gather_queries=4, gather_rows=500))
    shared, lone = "a:v7", "a:v8"
    plans = plan_batch([shared] * 40 + [lone, None], seg.compiled, 10, 4, len(seg), seg.nlist, seg.config)
    assert plans[shared].gather and plans[shared].probes == 0 and plans[shared].queries == 40
    assert not plans[lone].gather and plans[lone].probes > 0
    assert plans[None].filter is None and plans[None].share == 1.0 and plans[None].probes == 4
    assert 0.0 < plans[shared].share < 0.05


def test_plan_batch_plans_no_scan_for_a_constant_false_filter_or_an_empty_segment():
    attrs = AttributeStore.build([{"a": f"v{i % 3}"} for i in range(100)])
    seg = Segment.build(torch.randn(100, 4), attrs, config=IndexConfig(nlist=4))
    plans = plan_batch(["a:nothere"], seg.compiled, 5, None, len(seg), seg.nlist, seg.config)
    assert plans["a:nothere"].probes == 0
    assert plan_batch([None], seg.compiled, 5, None, 0, seg.nlist, seg.config)[None].probes == 0
