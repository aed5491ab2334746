"""The fused filtered int8 IVF scan: every kernel equals a brute force written from the definition
(scores to float32 rounding, ids up to ties)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.index.attributes import AttributeStore
from sterling.index.bloom import BloomIndex
from sterling.ops.ivf_scan import Kernel, encode, ivf_scan, list_bounds
from sterling.ops.plan_program import ALL, AND, ANY, NONE, OR, TRUE, PlanProgram, bit_of, pack_rows, plan_mask


def random_bits(gen: torch.Generator, rows: int, n: int, density: float) -> torch.Tensor:
    """int64 [rows, ceil(n / 64)]: random Bloom bits, each set with probability ``density``."""
    return (
        torch.stack([pack_rows(torch.rand(n, generator=gen) < density) for _ in range(rows)])
        if rows
        else (torch.zeros(0, (n + 63) // 64, dtype=torch.int64))
    )


def random_program(draw, rows: int) -> PlanProgram:
    """A random well-formed program of 1-3 plans over ``rows`` Bloom rows."""
    plans_ops, plans_rows, starts = [], [], [0]
    for _ in range(draw(st.integers(1, 3))):
        height = 0
        for _ in range(draw(st.integers(1, 6))):
            choices = ["leaf", "true"] + (["combine"] if height >= 2 else [])
            kind = draw(st.sampled_from(choices))
            if kind == "leaf":
                picked = draw(st.lists(st.integers(0, rows - 1), min_size=1, max_size=3))
                code = draw(st.sampled_from([ALL, ANY, NONE]))
                plans_ops.append((code, len(plans_rows), len(plans_rows) + len(picked)))
                plans_rows += picked
                height += 1
            elif kind == "true":
                plans_ops.append((TRUE, 0, 0))
                height += 1
            else:
                n = draw(st.integers(2, height))
                plans_ops.append((draw(st.sampled_from([AND, OR])), n, 0))
                height -= n - 1
        if height > 1:
            plans_ops.append((AND, height, 0))
        starts.append(len(plans_ops))
    return PlanProgram(
        torch.tensor(plans_ops).reshape(-1, 3),
        torch.tensor(plans_rows, dtype=torch.int64),
        torch.tensor(starts),
        depth=len(plans_ops),
    )


@st.composite
def problems(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    n = draw(st.integers(0, 700))
    d = draw(st.sampled_from([1, 3, 16, 64, 100, 128]))
    nlist = draw(st.integers(1, 9))
    b = draw(st.integers(1, 6))
    cuts = torch.sort(torch.randint(0, n + 1, (nlist - 1,), generator=gen)).values
    offsets = torch.cat([torch.tensor([0]), cuts, torch.tensor([n])])
    p = draw(st.integers(1, nlist))
    probes = torch.stack([torch.randperm(nlist, generator=gen)[:p] for _ in range(b)])
    probes[torch.rand(b, p, generator=gen) < 0.2] = -1
    rows = draw(st.integers(1, 4))
    density = draw(st.sampled_from([0.0, 0.01, 0.5, 1.0]))
    bits = random_bits(gen, rows, n, density)
    program = random_program(draw, rows)
    plan_of = torch.randint(-1, len(program), (b,), generator=gen)
    alive = pack_rows(torch.rand(n, generator=gen) < 0.8) if draw(st.booleans()) else None
    return dict(
        queries=torch.randn(b, d, generator=gen),
        codes=torch.randint(-127, 128, (n, d), generator=gen, dtype=torch.int8),
        scales=torch.rand(n, generator=gen) + 0.01,
        list_offsets=offsets,
        probes=probes,
        k=draw(st.integers(1, 60)),
        bits=bits,
        program=program,
        plan_of=plan_of,
        alive=alive,
    )


def brute_force(p: dict) -> list[dict[int, float]]:
    """Per query: {row: score} of every probed, live row passing its plan (from the definition)."""
    out = []
    for b in range(p["queries"].shape[0]):
        found = {}
        for c in p["probes"][b].tolist():
            if c < 0:
                continue
            for r in range(int(p["list_offsets"][c]), int(p["list_offsets"][c + 1])):
                rows = torch.tensor([r])
                g = int(p["plan_of"][b])
                if g >= 0 and not bool(plan_mask(p["bits"], p["program"], g, rows)[0]):
                    continue
                if p["alive"] is not None and not bool(bit_of(p["alive"], rows)[0]):
                    continue
                dot = float(p["codes"][r].double() @ p["queries"][b].double())
                found[r] = dot * float(p["scales"][r])
        out.append(found)
    return out


def check_top_k(scores: torch.Tensor, rows: torch.Tensor, truth: list[dict[int, float]], k: int) -> None:
    """Count, padding, distinct rows, each row's score, descending order, and no better row left out
    (float32 rounding aside)."""
    for b, found in enumerate(truth):
        want = sorted(found.values(), reverse=True)[:k]
        count = len(want)
        assert torch.isneginf(scores[b, count:]).all() and (rows[b, count:] == -1).all()
        got = rows[b, :count].tolist()
        assert len(set(got)) == count and all(r in found for r in got)
        tol = 1e-4 * (1 + max((abs(v) for v in found.values()), default=0))
        for r, s in zip(got, scores[b, :count].tolist()):
            assert abs(found[r] - s) <= tol
        assert (scores[b, :count].diff() <= tol).all()
        if count:
            assert min(found[r] for r in got) >= want[-1] - 2 * tol


@settings(max_examples=60, deadline=None)
@given(problems())
def test_kernels_equal_brute_force(p: dict) -> None:
    truth = brute_force(p)
    for kernel in (Kernel.REFERENCE, Kernel.CPU):
        scores, rows = ivf_scan(**p, kernel=kernel)
        assert scores.shape == rows.shape == (p["queries"].shape[0], p["k"])
        check_top_k(scores, rows, truth, p["k"])


def passing_scores(p: dict) -> list[dict[int, float]]:
    """Per query: {row: score} of every probed, live row passing its plan, from the reference kernel
    asked for every row (itself checked against the definition above)."""
    scores, rows = ivf_scan(**{**p, "k": max(1, len(p["codes"]))}, kernel=Kernel.REFERENCE)
    return [{r: s for r, s in zip(rr.tolist(), ss.tolist()) if r >= 0} for rr, ss in zip(rows, scores)]


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    d=st.sampled_from([64, 128, 36]),
    density=st.sampled_from([0.02, 0.3, 1.0]),
    b=st.sampled_from([1, 3, 40]),
    k=st.integers(1, 150),
    with_alive=st.booleans(),
)
def test_list_major_scan_equals_the_reference(seed, d, density, b, k, with_alive) -> None:
    """Batches where many queries probe each list (so most lists are scored in 16-row blocks on the
    int8 units, with each query's int8 cut) and where few do (rows scored one by one): the top-k
    equals the definition, for queries of any magnitude, a zero query included."""
    gen = torch.Generator().manual_seed(seed)
    n, nlist = 1500, 7
    cuts = torch.sort(torch.randint(0, n + 1, (nlist - 1,), generator=gen)).values
    queries = torch.randn(b, d, generator=gen) * torch.logspace(-3, 3, b)[:, None]
    queries[0] = 0
    p = dict(
        queries=queries,
        codes=torch.randint(-127, 128, (n, d), generator=gen, dtype=torch.int8),
        scales=torch.rand(n, generator=gen) + 0.01,
        list_offsets=torch.cat([torch.tensor([0]), cuts, torch.tensor([n])]),
        probes=torch.stack([torch.randperm(nlist, generator=gen)[:4] for _ in range(b)]),
        k=k,
        bits=random_bits(gen, 3, n, density),
        program=PlanProgram(
            torch.tensor([[ANY, 0, 1], [ALL, 1, 3], [TRUE, 0, 0]]),
            torch.tensor([0, 1, 2]),
            torch.tensor([0, 1, 2, 3]),
            depth=1,
        ),
        plan_of=torch.randint(-1, 3, (b,), generator=gen),
        alive=pack_rows(torch.rand(n, generator=gen) < 0.9) if with_alive else None,
    )
    check_top_k(*ivf_scan(**p, kernel=Kernel.CPU), passing_scores(p), k)


def test_ties_go_to_the_lower_row_whatever_the_batch_and_threads() -> None:
    """Equal scores are ordered by row, so a query's answer does not depend on the queries it is
    batched with or on how many threads split the lists (a served answer equals the model's)."""
    gen = torch.Generator().manual_seed(0)
    n, d, k = 3000, 64, 30
    codes = torch.randint(-127, 128, (n, d), generator=gen, dtype=torch.int8)
    codes[::2] = 0  # every even row scores 0 for any query
    offsets = torch.tensor([0, 700, 1500, 2200, 3000])
    queries = torch.randn(12, d, generator=gen)
    queries[0] = 0  # every row ties at 0
    probes = torch.stack([torch.randperm(4, generator=gen) for _ in range(12)])
    args = dict(codes=codes, scales=torch.rand(n, generator=gen) + 0.01, list_offsets=offsets, k=k)
    alone = ivf_scan(queries[:1], probes=probes[:1], **args, kernel=Kernel.CPU)
    assert alone[1][0].tolist() == list(range(k))  # all tie: the k lowest rows, in order
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            batched = ivf_scan(queries, probes=probes, **args, kernel=Kernel.CPU)
            assert torch.equal(batched[1][:1], alone[1]) and torch.equal(batched[0][:1], alone[0])
            for i in range(1, 12):  # rows that tie at the k-th score still come back in row order
                one = ivf_scan(queries[i : i + 1], probes=probes[i : i + 1], **args, kernel=Kernel.CPU)
                assert torch.equal(batched[1][i], one[1][0])
    finally:
        torch.set_num_threads(threads)


def test_list_bounds_are_each_lists_largest_rounding_effect() -> None:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (50, 8), generator=gen, dtype=torch.int8)
    scales = torch.rand(50, generator=gen)
    offsets = torch.tensor([0, 10, 10, 50])
    want = [
        max((float(scales[r]) * float(codes[r].abs().sum()) / 2 for r in range(s, e)), default=0.0)
        for s, e in zip(offsets[:-1].tolist(), offsets[1:].tolist())
    ]
    assert list_bounds(codes, scales, offsets).tolist() == pytest.approx(want, rel=1e-6)


def test_bloom_plans_run_in_the_kernel() -> None:
    """Real compiled Bloom plans (NOT, IN, numeric ranges) over a cluster-sorted layout."""
    gen = torch.Generator().manual_seed(0)
    n, d = 3000, 32
    store = AttributeStore.build(
        [{"a": f"v{i % 7}", "t": [f"x{(i * 13) % 50}", f"x{(i * 7) % 50}"], "y": i % 30} for i in range(n)]
    )
    bloom = BloomIndex.build(store)
    exprs = ["a:v1", "NOT t:x3", "(a:v2 OR y >= 20) AND NOT t:x4", "t IN (x1, x2)", "a:none"]
    program = encode([bloom.compile(e) for e in exprs])
    b = 10
    p = dict(
        queries=torch.randn(b, d, generator=gen),
        codes=torch.randint(-127, 128, (n, d), generator=gen, dtype=torch.int8),
        scales=torch.rand(n, generator=gen) + 0.1,
        list_offsets=torch.tensor([0, 500, 1200, 1201, 1201, 3000]),
        probes=torch.stack([torch.randperm(5, generator=gen)[:3] for _ in range(b)]),
        k=400,
        bits=bloom.bits,
        program=program,
        plan_of=torch.tensor([-1, 0, 1, 2, 3, 4, 0, 1, 2, 3]),
        alive=pack_rows(torch.rand(n, generator=gen) < 0.9),
    )
    truth = brute_force(p)
    check_top_k(*ivf_scan(**p, kernel=Kernel.CPU), truth, p["k"])
    assert not truth[5]  # a value no item holds: nothing passes


def test_large_k_and_empty_inputs() -> None:
    codes = torch.randint(-127, 128, (100, 8), dtype=torch.int8)
    args = (torch.ones(2, 8), codes, torch.ones(100), torch.tensor([0, 40, 100]))
    scores, rows = ivf_scan(*args, torch.tensor([[0, 1], [1, -1]]), 10_000)
    assert (rows[0] >= 0).sum() == 100 and (rows[1] >= 0).sum() == 60
    scores, rows = ivf_scan(
        torch.ones(0, 8), codes, torch.ones(100), torch.tensor([0, 100]), torch.zeros(0, 1, dtype=torch.int64), 5
    )
    assert scores.shape == (0, 5)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(queries=torch.ones(2, 8, dtype=torch.float64)), "queries must be float32"),
        (dict(queries=torch.full((2, 8), float("nan"))), "queries contain NaN"),
        (dict(codes=torch.ones(10, 4, dtype=torch.int8)), "codes must be int8 \\[N, D=8\\]"),
        (dict(scales=torch.ones(1)), "scales must be float32 \\[N=10\\]"),
        (dict(list_offsets=torch.tensor([0, 5])), "list_offsets must rise from 0 to N=10"),
        (dict(probes=torch.tensor([[0], [2]])), "probes must lie in"),
        (dict(probes=torch.tensor([[0, 0], [0, 1]])), "must not repeat"),
        (dict(k=0), "k must be an int >= 1"),
        (dict(alive=torch.ones(2, dtype=torch.int64)), "alive must be int64 \\[W=1\\]"),
        (dict(plan_of=torch.tensor([0, 1])), "plan_of must lie in"),
        (dict(bits=torch.zeros(1, 3, dtype=torch.int64)), "bits must be int64 \\[R, W=1\\]"),
        (dict(bounds=torch.ones(3)), "bounds must be float32 \\[nlist=2\\]"),
    ],
)
def test_validation(change: dict, message: str) -> None:
    p = dict(
        queries=torch.ones(2, 8),
        codes=torch.ones(10, 8, dtype=torch.int8),
        scales=torch.ones(10),
        list_offsets=torch.tensor([0, 4, 10]),
        probes=torch.tensor([[0, 1], [1, -1]]),
        k=3,
        bits=torch.zeros(1, 1, dtype=torch.int64),
        program=PlanProgram(torch.tensor([[ANY, 0, 1]]), torch.tensor([0]), torch.tensor([0, 1]), 1),
        plan_of=torch.tensor([0, -1]),
        alive=None,
    )
    with pytest.raises(ValueError, match=message):
        ivf_scan(**{**p, **change})


@pytest.mark.parametrize(
    "ops, rows, message",
    [
        ([[ANY, 0, 2]], [0], "leaf reads rows\\[0:2\\] of 1"),
        ([[ANY, 0, 1], [AND, 2, 0]], [0], "combines 2 of 1"),
        ([[ANY, 0, 1], [ANY, 0, 1]], [0], "leaves 2 words"),
        ([[9, 0, 0]], [], "unknown op code 9"),
        ([[ANY, 0, 1]], [5], "rows must lie in"),
        ([[ANY, 0, 1]] * 5 + [[AND, 5, 0]], [0], "plan 0: needs a stack deeper than depth=4"),
        ([[TRUE, 0, 0], [OR, 0, 0]], [], "combines 0 of 1"),
    ],
)
def test_malformed_programs_are_refused(ops, rows, message) -> None:
    program = PlanProgram(torch.tensor(ops), torch.tensor(rows, dtype=torch.int64), torch.tensor([0, len(ops)]), 4)
    with pytest.raises(ValueError, match=message):
        program.validate(num_bit_rows=2)


@pytest.mark.parametrize(
    "starts, message", [([0, 0, 1], "every plan needs at least one op"), ([0, 2], "run from 0 to the number of ops")]
)
def test_malformed_plan_starts_are_refused(starts, message) -> None:
    program = PlanProgram(torch.tensor([[ANY, 0, 1]]), torch.tensor([0]), torch.tensor(starts), 1)
    with pytest.raises(ValueError, match=message):
        program.validate(num_bit_rows=1)


def test_a_checked_program_is_checked_again_once_changed() -> None:
    program = PlanProgram(torch.tensor([[ANY, 0, 1]]), torch.tensor([1]), torch.tensor([0, 1]), 1)
    program.validate(num_bit_rows=2)
    program.validate(num_bit_rows=2)  # the same tensors: not checked again
    with pytest.raises(ValueError, match="rows must lie in"):
        program.validate(num_bit_rows=1)  # another row count is
    program.rows[0] = 5  # an in-place change is
    with pytest.raises(ValueError, match="rows must lie in"):
        program.validate(num_bit_rows=2)
    program.rows[0] = 1
    program.validate(num_bit_rows=2)
    program.ops[0, 2] = 2  # ops too
    with pytest.raises(ValueError, match="leaf reads rows"):
        program.validate(num_bit_rows=2)
