"""x-transformers' toggles as modules: memory key/values, talking heads, token shift, sandwich norm
and the ReLU² MLP, each against NumPy float64 written from its paper's formula (in a model, decoded
from a cache and trained: test_toggles_in_models.py)."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toggle_layers import HD, D, H, randomized, self_attention

from gptzoo import nn

SEQ = 7
ALIBI_SLOPES = 2.0 ** (-2.0 * np.arange(1, H + 1))  # 2^(-8k/H) for k = 1..H, H = 4


def f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def inputs(seq, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((2, seq, D)), jnp.float32)


def np_rotate(x, positions):
    """RoFormer, channel pairs (i, i + head_dim / 2) read as complex numbers, times e^{i m theta_i}
    at position m."""
    half = x.shape[-1] // 2
    theta = 10000.0 ** (-np.arange(half) / half)
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * np.outer(positions, theta))
    return np.concatenate([z.real, z.imag], axis=-1)


def np_attention(x, attention, positional=None, *, memory=None, mixes=None):
    """Causal attention head by head in float64 from the formulas: memory slots (`memory_k`,
    `memory_v`, per key/value head) visible to every query, unrotated and unbiased; talking heads
    `mixes = (pre, post)` over the heads' scores before the bias and softmax, and their weights
    after it."""
    x = f64(x)
    seq, n_kv = x.shape[-2], attention.n_kv_heads
    qkv = x @ f64(attention.qkv.weight) + f64(attention.qkv.bias)
    split = np.split(qkv, H + 2 * n_kv, axis=-1)
    qs, ks, vs = split[:H], split[H:H + n_kv], split[H + n_kv:]
    if positional == "rotary":
        qs, ks = ([np_rotate(a, np.arange(seq)) for a in heads] for heads in (qs, ks))
    kv_head = [h // (H // n_kv) for h in range(H)]
    scores = np.stack([qs[h] @ np.swapaxes(ks[kv_head[h]], -1, -2) for h in range(H)], -3)
    values = np.stack([vs[kv_head[h]] for h in range(H)], -3)
    scores, visible = scores / math.sqrt(HD), np.tril(np.ones((seq, seq), bool))
    if mixes is not None:
        scores = np.einsum("gh,...hqk->...gqk", f64(mixes[0]), scores)
    if positional == "alibi":
        distance = np.arange(seq)[:, None] - np.arange(seq)[None, :]
        scores = scores - ALIBI_SLOPES[:, None, None] * distance
    if memory is not None:
        memory_k, memory_v = map(f64, memory)
        memory_scores = np.stack([qs[h] @ memory_k[kv_head[h]].T for h in range(H)], -3)
        scores = np.concatenate([memory_scores / math.sqrt(HD), scores], -1)
        memory_values = np.broadcast_to(memory_v[kv_head],
                                        (*values.shape[:-2], *memory_v.shape[1:]))
        values = np.concatenate([memory_values, values], -2)
        visible = np.concatenate([np.ones((seq, memory_k.shape[1]), bool), visible], -1)
    scores = np.where(visible, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    if mixes is not None:
        weights = np.einsum("gh,...hqk->...gqk", f64(mixes[1]), weights)
    heads = np.moveaxis(weights @ values, -3, -2).reshape(*x.shape[:-1], H * HD)
    return heads @ f64(attention.out.weight) + f64(attention.out.bias)


# Memory key/values


@pytest.mark.parametrize("positional, n_kv_heads, seq", [
    (None, None, SEQ), ("rotary", 2, SEQ), ("alibi", 1, SEQ),
    ("rotary", 2, 130),  # the block-causal path of causal_attend on CPU
])
def test_memory_kv_matches_numpy(positional, n_kv_heads, seq):
    module = nn.MemoryKVAttention(self_attention(positional, n_kv_heads), num_mem_kv=3,
                                  key=jax.random.PRNGKey(1))
    kv_heads = n_kv_heads or H
    assert module.memory_k.shape == module.memory_v.shape == (kv_heads, 3, HD)
    module = randomized(module, 2)
    x = inputs(seq)
    expected = np_attention(x, module.attention, positional,
                            memory=(module.memory_k, module.memory_v))
    np.testing.assert_allclose(module(x), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(module(x[0]), expected[0], rtol=1e-4, atol=1e-5)
    # The memory matters: without it the output is the wrapped attention's.
    assert not np.allclose(module(x), module.attention(x), atol=1e-3)
    with pytest.raises(ValueError, match="num_mem_kv=0"):
        nn.MemoryKVAttention(module.attention, num_mem_kv=0, key=jax.random.PRNGKey(1))


# Talking heads


def test_talking_heads_start_as_the_attention_they_wrap():
    module = nn.TalkingHeadsAttention(randomized(self_attention("alibi", 2), 3))
    np.testing.assert_array_equal(module.pre_softmax, np.eye(H))
    np.testing.assert_array_equal(module.post_softmax, np.eye(H))
    for seq in (SEQ, 130):  # the wrapped attention's einsum and block-causal paths
        x = inputs(seq)
        np.testing.assert_allclose(module(x), module.attention(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("positional, n_kv_heads", [(None, None), ("alibi", 2), ("rotary", 1)])
def test_talking_heads_match_numpy_and_stay_causal(positional, n_kv_heads):
    module = randomized(nn.TalkingHeadsAttention(self_attention(positional, n_kv_heads)), 4)
    x = inputs(SEQ)
    expected = np_attention(x, module.attention, positional,
                            mixes=(module.pre_softmax, module.post_softmax))
    np.testing.assert_allclose(module(x), expected, rtol=1e-4, atol=1e-5)
    changed = x.at[:, 4:].set(inputs(SEQ - 4, seed=5))
    np.testing.assert_array_equal(module(changed)[:, :4], module(x)[:, :4])
    assert not np.allclose(module(changed)[:, 4:], module(x)[:, 4:], atol=1e-3)


# Token shift


@pytest.mark.parametrize("fraction, n_shifted", [(0.5, 8), (0.3, 4)])
def test_token_shift_matches_numpy(fraction, n_shifted):
    shift = nn.TokenShift(randomized(nn.LayerNorm(D), 6), fraction=fraction)
    x = inputs(SEQ)
    normed = f64(shift.norm(x))
    expected = normed.copy()
    expected[:, 0, :n_shifted] = 0.0
    expected[:, 1:, :n_shifted] = normed[:, :-1, :n_shifted]
    np.testing.assert_array_equal(shift(x), expected.astype(np.float32))
    np.testing.assert_array_equal(shift(x[1]), expected[1].astype(np.float32))


def test_token_shift_refuses_fractions_that_shift_nothing_or_too_much():
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match=f"fraction={fraction}"):
            nn.TokenShift(nn.LayerNorm(D), fraction=fraction)
    with pytest.raises(ValueError, match="shifts none"):
        nn.TokenShift(nn.LayerNorm(D), fraction=0.01)(inputs(SEQ))


# Sandwich norm and the ReLU² MLP


def np_layernorm(x, norm):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * f64(norm.weight) + f64(norm.bias)


def test_sandwich_block_normalises_each_sublayer_output():
    block = randomized(nn.Block(
        attn_norm=nn.LayerNorm(D), attention=self_attention("rotary"), mlp_norm=nn.LayerNorm(D),
        mlp=nn.MLP(D, key=jax.random.PRNGKey(7)), attn_out_norm=nn.LayerNorm(D),
        mlp_out_norm=nn.LayerNorm(D)), 8)
    x = inputs(SEQ)
    attn_in = jnp.asarray(np_layernorm(f64(x), block.attn_norm), jnp.float32)
    mid = f64(x) + np_layernorm(f64(block.attention(attn_in)), block.attn_out_norm)
    mlp_in = jnp.asarray(np_layernorm(mid, block.mlp_norm), jnp.float32)
    expected = mid + np_layernorm(f64(block.mlp(mlp_in)), block.mlp_out_norm)
    np.testing.assert_allclose(block(x), expected, rtol=1e-4, atol=1e-4)
    without = eqx.tree_at(lambda b: (b.attn_out_norm, b.mlp_out_norm), block, (None, None),
                          is_leaf=lambda n: n is None)
    assert not np.allclose(without(x), block(x), atol=1e-2)


def test_relu2_mlp_matches_numpy_and_unknown_activations_are_named():
    mlp = randomized(nn.MLP(D, activation="relu2", key=jax.random.PRNGKey(9)), 10)
    x = inputs(SEQ)
    h = np.maximum(f64(x) @ f64(mlp.up.weight) + f64(mlp.up.bias), 0.0) ** 2
    expected = h @ f64(mlp.down.weight) + f64(mlp.down.bias)
    np.testing.assert_allclose(mlp(x), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="'gelu', 'relu2'"):
        nn.MLP(D, activation="relu", key=jax.random.PRNGKey(9))
