"""The zoo's extra layers: RMSNorm, SwiGLU/GEGLU, parallel blocks and the causal SGU, each against
NumPy float64 or its formula written out."""

import math

import equinox as eqx
import jax
import numpy as np
import pytest
from zoo_parts_models import X, f64, randomize

from gptzoo import nn


def np_layernorm(x, weight, bias, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * weight + bias


# RMSNorm


@pytest.mark.parametrize("use_scale", [True, False])
def test_rmsnorm_matches_numpy(use_scale):
    norm = nn.RMSNorm(16, use_scale=use_scale)
    assert (norm.scale is None) == (not use_scale)
    if use_scale:
        norm = randomize(norm, jax.random.PRNGKey(1))
    x = f64(X)
    expected = x / np.sqrt((x * x).sum(-1, keepdims=True) / 16 + 1e-6)
    if use_scale:
        expected = expected * f64(norm.scale)
    np.testing.assert_allclose(norm(X), expected, rtol=1e-5, atol=1e-6)


def test_rmsnorm_output_has_unit_rms_and_rejects_bad_eps():
    y = f64(nn.RMSNorm(16, use_scale=False)(3.0 * X))
    np.testing.assert_allclose(np.sqrt((y**2).mean(-1)), 1.0, rtol=1e-4)
    with pytest.raises(ValueError, match="eps"):
        nn.RMSNorm(16, eps=0.0)


# SwiGLU / GEGLU


def np_silu(g):
    return g / (1 + np.exp(-g))


def np_gelu_tanh(g):
    return 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))


@pytest.mark.parametrize("activation, np_act", [("silu", np_silu), ("gelu", np_gelu_tanh)])
def test_glu_mlp_matches_numpy(activation, np_act):
    mlp = nn.GLUMLP(16, activation=activation, multiple_of=8, key=jax.random.PRNGKey(2))
    mlp = randomize(mlp, jax.random.PRNGKey(3), scale=0.3)
    hidden = 48  # int(2 * 4 * 16 / 3) = 42, rounded up to a multiple of 8
    assert mlp.gate_up.weight.shape == (16, 2 * hidden) and mlp.down.weight.shape == (hidden, 16)
    w, b = f64(mlp.gate_up.weight), f64(mlp.gate_up.bias)
    x = f64(X)
    gate = x @ w[:, :hidden] + b[:hidden]
    up = x @ w[:, hidden:] + b[hidden:]
    expected = (np_act(gate) * up) @ f64(mlp.down.weight) + f64(mlp.down.bias)
    np.testing.assert_allclose(mlp(X), expected, rtol=1e-4, atol=1e-5)


def test_glu_mlp_without_bias_and_bad_activation():
    mlp = nn.GLUMLP(16, use_bias=False, multiple_of=32, key=jax.random.PRNGKey(2))
    assert mlp.gate_up.bias is None and mlp.down.bias is None
    assert mlp(X[0]).shape == (6, 16)  # no batch dimension
    with pytest.raises(ValueError, match="'silu' .* 'gelu'"):
        nn.GLUMLP(16, activation="relu", key=jax.random.PRNGKey(2))


def test_llama_hidden_dim_matches_llama():
    # LLaMA-7B, 13B, 33B and 65B feed-forward widths.
    assert nn.llama_hidden_dim(4096, hidden_mult=4, multiple_of=256) == 11008
    assert nn.llama_hidden_dim(4096) == 11008
    assert nn.llama_hidden_dim(5120) == 13824
    assert nn.llama_hidden_dim(6656) == 17920
    assert nn.llama_hidden_dim(8192) == 22016
    assert nn.llama_hidden_dim(128, multiple_of=32) == 352  # int(341.3) -> 352
    with pytest.raises(ValueError, match="multiple_of"):
        nn.llama_hidden_dim(128, multiple_of=0)


# Parallel residual blocks


def parallel_parts():
    keys = jax.random.split(jax.random.PRNGKey(4), 4)
    # Weights large enough that attention's output visibly changes the MLP's input.
    attention = randomize(nn.CausalSelfAttention(16, 4, key=keys[0]), keys[0], scale=0.3)
    mlp = randomize(nn.MLP(16, key=keys[1]), keys[1], scale=0.3)
    norm1 = randomize(nn.LayerNorm(16), keys[2])
    norm2 = randomize(nn.LayerNorm(16), keys[3])
    return attention, mlp, norm1, norm2


def test_parallel_block_gpt_j_shares_one_norm():
    attention, mlp, norm1, norm2 = parallel_parts()
    block = nn.ParallelBlock(attn_norm=norm1, attention=attention, mlp=mlp)
    assert block.mlp_norm is None
    h = norm1(X)
    np.testing.assert_allclose(block(X), X + attention(h) + mlp(h), rtol=1e-5, atol=1e-6)
    # The MLP really reads norm1's output: another norm would give another result.
    assert not np.allclose(block(X), X + attention(h) + mlp(norm2(X)), atol=1e-4)


def test_parallel_block_gpt_neox_has_two_norms():
    attention, mlp, norm1, norm2 = parallel_parts()
    block = nn.ParallelBlock(attn_norm=norm1, attention=attention, mlp=mlp, mlp_norm=norm2)
    expected = X + attention(norm1(X)) + mlp(norm2(X))
    np.testing.assert_allclose(block(X), expected, rtol=1e-5, atol=1e-6)
    # Unlike the sequential Block, the MLP does not see the attention's output.
    sequential = nn.Block(attn_norm=norm1, attention=attention, mlp_norm=norm2, mlp=mlp)
    assert not np.allclose(block(X), sequential(X), atol=1e-4)


# Spatial gating unit


def np_sgu(sgu, x):
    """`u * (W v + b)` as explicit sums over the positions j <= i."""
    x = f64(x)
    half = x.shape[-1] // 2
    u, v = x[..., :half], np_layernorm(x[..., half:], f64(sgu.norm.weight), f64(sgu.norm.bias))
    w, b = f64(sgu.weight), f64(sgu.bias)
    gate = np.zeros_like(v)
    for i in range(x.shape[-2]):
        gate[..., i, :] = b[i] + sum(w[i, j] * v[..., j, :] for j in range(i + 1))
    return u * gate


def test_sgu_matches_numpy_at_full_and_shorter_lengths():
    sgu = randomize(nn.SpatialGatingUnit(8, 6, key=jax.random.PRNGKey(5)), jax.random.PRNGKey(6))
    np.testing.assert_allclose(sgu(X), np_sgu(sgu, X), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sgu(X[:, :4]), np_sgu(sgu, X[:, :4]), rtol=1e-4, atol=1e-5)


def test_sgu_starts_as_pass_through_of_u():
    sgu = nn.SpatialGatingUnit(8, 6, key=jax.random.PRNGKey(5))
    np.testing.assert_allclose(sgu(X), X[..., :8], atol=1e-3)


def test_sgu_mlp_is_causal():
    mlp = nn.SGUMLP(16, 6, key=jax.random.PRNGKey(7))
    # A random upper triangle would leak the future if the mask were missing.
    mlp = eqx.tree_at(lambda m: m.sgu.weight, mlp, jax.random.normal(jax.random.PRNGKey(8), (6, 6)))
    changed = X.at[:, 3].set(jax.random.normal(jax.random.PRNGKey(9), (2, 16)))
    before, after = mlp(X), mlp(changed)
    np.testing.assert_array_equal(before[:, :3], after[:, :3])
    assert not np.allclose(before[:, 3:], after[:, 3:])
    # A shorter sequence sees the same top-left corner of W.
    np.testing.assert_allclose(mlp(X[:, :4]), before[:, :4], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exceeds block_size=4"):
        nn.SGUMLP(16, 4, key=jax.random.PRNGKey(7))(X)
