import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.models.towers import ItemTerms, TwoTower, TwoTowerConfig


def make_model(**kw):
    cfg = TwoTowerConfig(
        num_items=50,
        num_terms=7,
        tasks=("click", "like"),
        context_features=("surface",),
        user_features=("age",),
        dim=16,
        hidden=24,
        max_history=8,
        **kw,
    )
    torch.manual_seed(0)
    return TwoTower(cfg).eval()


def test_item_terms_vocab_and_unseen_terms():
    terms = ItemTerms.build([{"genre": ["a", "b"], "year": 1995}, {"genre": "a"}, {}])
    assert terms.vocab == ("genre=a", "genre=b", "year=1995")
    assert terms.offsets.tolist() == [0, 3, 4, 4]
    assert terms.terms.tolist() == [0, 1, 2, 0]
    again = ItemTerms.build([{"genre": ["z", "b"]}], vocab=terms.vocab)
    assert again.terms.tolist() == [1]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=6), st.randoms(use_true_random=False))
def test_user_tower_batched_equals_one_request_at_a_time(lengths, rnd):
    """The jagged batch computes every request exactly as if it were alone (no padding leaks)."""
    model = make_model()
    table = torch.randn(50, 16)
    hist = [[rnd.randrange(50) for _ in range(n)] for n in lengths]
    acts = [[rnd.randrange(4) for _ in range(n)] for n in lengths]
    feats = {
        "surface": torch.tensor([rnd.randrange(100) for _ in lengths]),
        "age": torch.tensor([rnd.randrange(100) for _ in lengths]),
    }
    offsets = torch.tensor([0] + list(torch.cumsum(torch.tensor(lengths), 0).tolist()))
    with torch.no_grad():
        batched = model.encode_users(
            table[torch.tensor(sum(hist, []), dtype=torch.int64)],
            torch.tensor(sum(acts, []), dtype=torch.int64),
            offsets,
            feats,
        )
        for r, n in enumerate(lengths):
            alone = model.encode_users(
                table[torch.tensor(hist[r], dtype=torch.int64)],
                torch.tensor(acts[r], dtype=torch.int64),
                torch.tensor([0, n]),
                {k: v[r : r + 1] for k, v in feats.items()},
            )
            torch.testing.assert_close(batched[r : r + 1], alone, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(len(lengths)))


def test_user_tower_accepts_histories_longer_than_its_recency_table():
    model = make_model()
    with torch.no_grad():
        out = model.encode_users(torch.randn(30, 16), torch.ones(30, dtype=torch.int64), torch.tensor([0, 30]), {})
    assert out.shape == (1, 16) and torch.isfinite(out).all()


def test_item_tower_rows_independent_of_batch():
    model = make_model()
    terms = ItemTerms.build([{"g": [str(i % 3), str(i % 5)]} for i in range(50)])
    with torch.no_grad():
        all_items = model.encode_items(torch.arange(50), terms)
        some = model.encode_items(torch.tensor([7, 3, 41]), terms)
    torch.testing.assert_close(all_items[[7, 3, 41]], some)


def test_duplicate_feature_names_rejected():
    cfg = TwoTowerConfig(num_items=5, num_terms=1, tasks=("c",), context_features=("x",), user_features=("x",))
    try:
        TwoTower(cfg)
    except ValueError as e:
        assert "distinct" in str(e)
    else:
        raise AssertionError("expected a ValueError")
