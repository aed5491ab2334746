"""OverArch variants: shapes, the cached item state, masking and batch independence."""

import pytest
import torch

from sterling.models.overarch import OverArchConfig, make_overarch
from sterling.models.towers import TaskQueries

B, L, M, D, T = 3, 7, 5, 16, 2


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    norm = torch.nn.functional.normalize
    user = norm(torch.randn(B, D, generator=gen), dim=-1)
    queries = norm(torch.randn(B, T, D, generator=gen), dim=-1)
    history = norm(torch.randn(B, L, D, generator=gen), dim=-1)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2] = False  # an empty history
    items = norm(torch.randn(B, M, D, generator=gen), dim=-1)
    return user, queries, history, mask, items


@pytest.mark.parametrize("kind", ["mlp", "mol"])
def test_shapes_masking_and_batch_independence(kind):
    torch.manual_seed(0)
    arch = make_overarch(OverArchConfig(kind=kind, dim=D, num_tasks=T, hidden=8, components=3, component_dim=4))
    user, queries, history, mask, items = inputs()
    state = arch.item_state(items)
    assert state.shape == (B, M, arch.state_dim)
    assert torch.equal(state[..., :D], items)  # the cache's first D columns are the embeddings
    out = arch(user, queries, history, mask, state)
    assert out.shape == (B, M, T) and torch.isfinite(out).all()
    scrambled = history.clone()
    scrambled[~mask] = 100.0  # values behind the mask do not matter
    torch.testing.assert_close(arch(user, queries, scrambled, mask, state), out)
    for b in range(B):  # each request's scores depend on that request only
        alone = arch(user[b : b + 1], queries[b : b + 1], history[b : b + 1], mask[b : b + 1], state[b : b + 1])
        torch.testing.assert_close(alone[0], out[b], rtol=1e-5, atol=1e-5)


def test_an_empty_history_gives_finite_gradients():
    arch = make_overarch(OverArchConfig(kind="mol", dim=D, num_tasks=T, hidden=8, components=3, component_dim=4))
    user, queries, history, mask, items = inputs(1)
    mask[:] = False
    arch(user, queries, history, mask, arch.item_state(items)).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in arch.parameters() if p.grad is not None)


def test_config_is_checked():
    with pytest.raises(ValueError, match="'mlp' or 'mol'"):
        OverArchConfig(kind="attention")
    with pytest.raises(ValueError, match="components >= 2"):
        OverArchConfig(kind="mol", components=1)


def test_task_queries_start_as_the_user_embedding():
    users = torch.nn.functional.normalize(torch.randn(4, D), dim=-1)
    queries = TaskQueries(D, 3)(users)
    assert queries.shape == (4, 3, D)
    torch.testing.assert_close(queries, users[:, None, :].expand(-1, 3, -1))
