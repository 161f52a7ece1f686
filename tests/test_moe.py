"""Mixture of experts: the grouped expert paths equal every expert run densely (outputs and
gradients, any routing); the layer equals transformers' `MixtralSparseMoeBlock` and its
statistics give transformers' `load_balancing_loss_func` over several layers (value and gradient);
statistics summed through a `Stack` of `MoEBlock`s equal the loss of each layer's router logits;
the KV-cached decode through MoE blocks equals the full forward."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import (
    MixtralSparseMoeBlock,
    load_balancing_loss_func,
)

from gptzoo import nn
from gptzoo.nn.experts import expert_path
from gptzoo.nn.stack import Stack, decode_blocks, init_caches, run_blocks

E, K, D, HIDDEN = 4, 2, 32, 48
X = jax.random.normal(jax.random.PRNGKey(1), (2, 9, D))


def moe(path: str = "auto", init_std: float = 0.3) -> nn.MoEMLP:
    """Weights far from a fresh init's, so that routing is decisive and outputs are not small."""
    return nn.MoEMLP(D, n_experts=E, top_k=K, d_hidden=HIDDEN, path=path, init_std=init_std,
                     out_init_std=init_std, key=jax.random.PRNGKey(0))


def skewed(layer: nn.MoEMLP, x):
    """Inputs and router such that every token's first choice is expert 2."""
    router = layer.router.weight.at[:, 2].add(0.5)
    return eqx.tree_at(lambda m: m.router.weight, layer, router), x + 1.0


def expert_output(layer, x, **call):
    rows = x.reshape(-1, D)
    choices, weights, _ = nn.route(layer.router(rows), K)
    return layer.experts(rows, choices, weights, **call)


@pytest.mark.parametrize("routing", ["random", "skewed"])
def test_grouped_paths_equal_every_expert_run_densely_with_their_gradients(routing):
    layer, x = (moe(), X) if routing == "random" else skewed(moe(), X)
    counts = nn.route(layer.router(x.reshape(-1, D)), K)[2].expert_counts
    assert (counts[2] == X.shape[0] * X.shape[1]) == (routing == "skewed")
    probe = jax.random.normal(jax.random.PRNGKey(2), (X.shape[0] * X.shape[1], D))

    @eqx.filter_jit
    def value_and_grads(layer, x, call):
        def loss(inputs):
            return jnp.sum(expert_output(*inputs, **call) * probe)

        return eqx.filter_value_and_grad(loss)((layer, x))

    def flat(tree):
        return jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))

    want = flat(value_and_grads(layer, x, {"path": "dense"}))
    calls = [{"path": "ragged"}, {"path": "blocks"},  # block_rows from the number of rows
             *({"path": "blocks", "block_rows": b} for b in (1, 3, 64))]
    for call in calls:
        got = flat(value_and_grads(layer, x, call))
        assert len(got) == len(want) == 5  # the value, router, gate_up, down, x
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=str(call))


def test_the_layer_equals_transformers_mixtral_sparse_moe_block():
    config = MixtralConfig(hidden_size=D, intermediate_size=HIDDEN, num_local_experts=E,
                           num_experts_per_tok=K, experts_implementation="eager")
    theirs = MixtralSparseMoeBlock(config).eval()
    ours = moe()
    # Ours stores (in, out) with a leading expert axis; transformers (out, in): the router
    # (E, d), the experts' gate_up_proj (E, 2 hidden, d) with the gate rows first, down_proj
    # (E, d, hidden).
    with torch.no_grad():
        theirs.gate.weight.copy_(torch.tensor(np.asarray(ours.router.weight.T)))
        theirs.experts.gate_up_proj.copy_(torch.tensor(np.asarray(
            ours.experts.gate_up.transpose(0, 2, 1))))
        theirs.experts.down_proj.copy_(torch.tensor(np.asarray(
            ours.experts.down.transpose(0, 2, 1))))
        want = theirs(torch.tensor(np.asarray(X))).numpy()
    assert np.abs(want).mean() > 0.1  # outputs far from zero: the comparison means something
    for path in ("dense", "ragged", "blocks"):
        got, _ = eqx.filter_jit(lambda m, x, path: m(x, path=path))(ours, X, path)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=path)


def stats_of(logits_per_layer) -> nn.RouterStats:
    stats = [nn.route(logits, K)[2] for logits in logits_per_layer]
    return sum(stats[1:], stats[0])


def test_load_balancing_loss_equals_transformers_over_several_layers():
    # Three layers' router logits; the last concentrates on one expert, so that the loss of the
    # layers together differs from the mean of their losses.
    logits = jax.random.normal(jax.random.PRNGKey(3), (3, 14, E)) * 2
    logits = logits.at[2, :, 1].add(4.0)
    ours, grad = jax.value_and_grad(lambda lg: nn.load_balancing_loss(stats_of(lg)))(logits)
    theirs_logits = torch.tensor(np.asarray(logits), requires_grad=True)
    theirs = load_balancing_loss_func(tuple(theirs_logits), num_experts=E, top_k=K)
    theirs.backward()
    np.testing.assert_allclose(ours, theirs.item(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad, theirs_logits.grad.numpy(), rtol=1e-5, atol=1e-6)
    per_layer = np.mean([nn.load_balancing_loss(stats_of(lg[None])) for lg in logits])
    assert abs(per_layer - float(ours)) > 1e-3
    # Equal probabilities score top_k, whatever the choices.
    assert np.isclose(nn.load_balancing_loss(stats_of(jnp.zeros((1, 8, E)))), K)


def moe_blocks(n_layers: int, path: str = "blocks") -> list[nn.MoEBlock]:
    keys = jax.random.split(jax.random.PRNGKey(4), n_layers)
    return [nn.MoEBlock(
        attn_norm=nn.RMSNorm(D),
        attention=nn.CausalSelfAttention(D, 4, positional=nn.Rotary(D // 4), use_bias=False,
                                         init_std=0.2, key=jax.random.fold_in(key, 0)),
        mlp_norm=nn.RMSNorm(D),
        mlp=nn.MoEMLP(D, n_experts=E, top_k=K, d_hidden=HIDDEN, path=path, init_std=0.3,
                      out_init_std=0.3, key=jax.random.fold_in(key, 1)),
    ) for key in keys]


def test_router_stats_summed_through_a_stack_give_the_loss_of_each_layers_logits():
    blocks = moe_blocks(3)
    # Each layer's router logits, from the layers' parts called one by one.
    x, logits = X, []
    for block in blocks:
        x = x + block.attention(block.attn_norm(x))
        h = block.mlp_norm(x)
        logits.append(torch.tensor(np.asarray(block.mlp.router(h).reshape(-1, E))))
        x = x + block.mlp(h)[0]
    want = load_balancing_loss_func(tuple(logits), num_experts=E, top_k=K).item()
    for stack in (Stack.from_blocks(blocks), Stack.from_blocks(blocks, remat="full"),
                  tuple(blocks)):
        y, stats = eqx.filter_jit(run_blocks)(stack, X)
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)
        assert stats.n_tokens == 3 * X.shape[0] * X.shape[1]
        np.testing.assert_allclose(nn.load_balancing_loss(stats), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scan", [True, False])
def test_cached_decode_through_moe_blocks_equals_the_full_forward(scan):
    blocks = moe_blocks(2)
    blocks = Stack.from_blocks(blocks) if scan else tuple(blocks)
    want, _ = run_blocks(blocks, X)
    cache = init_caches(blocks, lambda b: b.attention.init_cache(X.shape[1]))
    cache = jax.tree.map(lambda c: jnp.stack([c] * X.shape[0]), cache)  # per example
    decode = eqx.filter_jit(jax.vmap(lambda x, p, c: decode_blocks(blocks, x, p, c)))
    got = []
    for start, stop in ((0, 5), (5, 6), (6, 7), (7, 9)):  # a prompt, then a token at a time
        positions = jnp.broadcast_to(jnp.arange(start, stop), (X.shape[0], stop - start))
        y, cache = decode(X[:, start:stop], positions, cache)
        got.append(y)
    np.testing.assert_allclose(jnp.concatenate(got, axis=1), want, rtol=1e-5, atol=1e-5)


def test_bad_settings_are_refused_naming_the_fix():
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and n_experts=4"):
        nn.MoEMLP(D, n_experts=4, top_k=5, d_hidden=8, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="path='sparse' is unknown; choose auto, dense"):
        nn.MoEMLP(D, n_experts=4, top_k=2, d_hidden=8, path="sparse", key=jax.random.PRNGKey(0))


def test_auto_runs_the_experts_in_blocks_for_many_tokens_and_densely_for_a_few():
    assert jax.default_backend() == "cpu"
    assert expert_path("auto", n_choices=16 * 256 * 2, n_experts=4) == "blocks"
    assert expert_path("auto", n_choices=2, n_experts=4) == "dense"  # one token decoded
    assert expert_path("ragged", n_choices=2, n_experts=4) == "ragged"
