"""OverArch variants: shapes, the cached item state, masking and batch independence."""

import numpy as np
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


# ---- against plain per-pair computations --------------------------------------------------------


def plain_pair(user, query_dots, emb):
    """The pair features ``[u, e, u ⊙ e · √D, q_t · e for every t]`` of one (request, item)."""
    return torch.cat([user, emb, user * emb * D**0.5, query_dots])


def plain_mol(arch, user, queries, history, mask, items):
    """MoL logits ``[B, M, T]`` computed one (request, item, task) at a time."""
    p, c = arch.cfg.components, arch.cfg.component_dim
    out = torch.zeros(items.shape[0], items.shape[1], T)
    temperature = float(arch.log_history_temperature.exp())
    for b in range(items.shape[0]):
        valid = history[b][mask[b]]  # [l, D]
        sources = [user[b]]
        for i in range(p - 1):
            if len(valid):
                w = torch.softmax(valid @ arch.interest_queries[i] * D**0.5, 0)
                sources.append(w @ valid)
            else:
                sources.append(torch.zeros(D))
        user_comps = []
        for i, src in enumerate(sources):
            w = arch.user_proj.weight[i * c : (i + 1) * c]
            user_comps.append(torch.nn.functional.normalize(w @ src + arch.user_proj.bias[i * c : (i + 1) * c], dim=0))
        for m in range(items.shape[1]):
            emb, comps = items[b, m, :D], items[b, m, D:].view(p, c)
            logits = [float(user_comps[i] @ comps[i]) for i in range(p)]
            logits.append(float(torch.logsumexp(valid @ emb * temperature, 0) / temperature) if len(valid) else 0.0)
            dots = queries[b] @ emb  # [T]
            gate = arch.gate(plain_pair(user[b], dots, emb)).view(T, p + 1).softmax(-1)
            for t in range(T):
                mixed = float(gate[t] @ torch.tensor(logits))
                out[b, m, t] = mixed * arch.scale[t] + dots[t] * arch.retrieval_weight[t] + arch.bias[t]
    return out


@torch.no_grad()
def test_mol_equals_a_plain_per_pair_computation():
    torch.manual_seed(3)
    arch = make_overarch(OverArchConfig(kind="mol", dim=D, num_tasks=T, hidden=8, components=3, component_dim=4))
    user, queries, history, mask, items = inputs(2)
    state = arch.item_state(items)
    comps = state[..., D:].unflatten(-1, (3, 4))
    torch.testing.assert_close(comps.norm(dim=-1), torch.ones(B, M, 3))  # unit item components
    torch.testing.assert_close(
        arch(user, queries, history, mask, state),
        plain_mol(arch, user, queries, history, mask, state),
        rtol=1e-4,
        atol=1e-4,
    )


@torch.no_grad()
def test_mlp_equals_a_plain_per_pair_computation():
    torch.manual_seed(4)
    arch = make_overarch(OverArchConfig(kind="mlp", dim=D, num_tasks=T, hidden=8))
    user, queries, history, mask, items = inputs(3)
    assert arch.state_dim == D and torch.equal(arch.item_state(items), items)
    out = arch(user, queries, history, mask, items)
    for b in range(B):
        for m in range(M):
            want = arch.mlp(plain_pair(user[b], queries[b] @ items[b, m], items[b, m]))
            torch.testing.assert_close(out[b, m], want, rtol=1e-5, atol=1e-5)
    # the MLP does not read the history at all
    torch.testing.assert_close(arch(user, queries, torch.randn_like(history), ~mask, items), out)


@torch.no_grad()
def test_nearest_history_is_the_soft_maximum_over_the_unmasked_history():
    torch.manual_seed(5)
    arch = make_overarch(OverArchConfig(kind="mol", dim=D, num_tasks=T, hidden=8, components=2, component_dim=4))
    _, _, history, mask, items = inputs(4)
    near = arch.nearest_history(items, history, mask)  # [B, M]
    assert near.shape == (B, M)
    temperature = float(arch.log_history_temperature.exp())
    for b in range(B):
        valid = history[b][mask[b]]
        for m in range(M):
            if len(valid):
                sims = valid @ items[b, m]
                want = torch.logsumexp(sims * temperature, 0) / temperature
                assert (
                    float(sims.max()) - 1e-5
                    <= float(want)
                    <= float(sims.max()) + np.log(len(valid)) / temperature + 1e-5
                )
            else:
                want = torch.tensor(0.0)
            torch.testing.assert_close(near[b, m], want, rtol=1e-5, atol=1e-5)
    # changing what lies behind the mask (even to large values) changes nothing
    scrambled = history.clone()
    scrambled[~mask] = torch.randn(int((~mask).sum()), D) * 50
    torch.testing.assert_close(arch.nearest_history(items, scrambled, mask), near)
    torch.testing.assert_close(
        arch.user_components(torch.zeros(B, D), scrambled, mask), arch.user_components(torch.zeros(B, D), history, mask)
    )


@pytest.mark.parametrize("kind", ["mlp", "mol"])
@torch.no_grad()
def test_an_all_empty_history_gives_finite_outputs(kind):
    torch.manual_seed(6)
    arch = make_overarch(OverArchConfig(kind=kind, dim=D, num_tasks=T, hidden=8, components=3, component_dim=4))
    user, queries, history, mask, items = inputs(5)
    for width in (L, 0):  # padded to L, or no history columns at all
        out = arch(
            user, queries, history[:, :width] * 0, torch.zeros(B, width, dtype=torch.bool), arch.item_state(items)
        )
        assert out.shape == (B, M, T) and torch.isfinite(out).all()
        if kind == "mol":
            torch.testing.assert_close(
                out,
                plain_mol(
                    arch,
                    user,
                    queries,
                    history[:, :width],
                    torch.zeros(B, width, dtype=torch.bool),
                    arch.item_state(items),
                ),
                rtol=1e-4,
                atol=1e-4,
            )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "MoL"}, "'mlp' or 'mol'"),
        ({"kind": "mol", "components": 0}, "components >= 2"),
        ({"dim": 0}, "dim must be >= 1"),
        ({"num_tasks": 0}, "num_tasks"),
        ({"hidden": 0}, "hidden"),
        ({"component_dim": 0}, "component_dim"),
    ],
)
def test_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OverArchConfig(**kwargs)
    assert OverArchConfig(kind="mlp", components=1).components == 1  # components only matter for MoL


@pytest.mark.parametrize("kind", ["mlp", "mol"])
@torch.no_grad()
def test_batch_independence_under_a_shuffle(kind):
    """Permuting the requests of a batch (with their histories and items) permutes the outputs."""
    torch.manual_seed(7)
    arch = make_overarch(OverArchConfig(kind=kind, dim=D, num_tasks=T, hidden=8, components=3, component_dim=4))
    user, queries, history, mask, items = inputs(6)
    state = arch.item_state(items)
    out = arch(user, queries, history, mask, state)
    perm = torch.tensor([2, 0, 1])
    shuffled = arch(user[perm], queries[perm], history[perm], mask[perm], state[perm])
    torch.testing.assert_close(shuffled, out[perm], rtol=1e-5, atol=1e-5)
    # one request's items scored alone equal the same items scored beside others
    torch.testing.assert_close(arch(user, queries, history, mask, state[:, :2]), out[:, :2], rtol=1e-5, atol=1e-5)
