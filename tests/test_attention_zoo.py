"""Grouped-query attention and the position hooks (rotary, ALiBi), each against NumPy float64 or
the paper's formula written out differently, plus the properties they exist for: relative
positions, causality, and running an ALiBi GPT past its block_size."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptzoo import nn
from gptzoo.models import GPT

D_MODEL, N_HEADS, SEQ = 32, 4, 7
HEAD_DIM = D_MODEL // N_HEADS


def normal(seed, shape, scale=1.0):
    """N(0, scale^2) float32 draws; NumPy's, since each new shape jax.random compiles costs ~1 s."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


X = normal(0, (2, SEQ, D_MODEL))


def attention(*, n_kv_heads=None, positional=None, seed=1):
    """An attention whose weights and biases are all drawn N(0, 0.3^2), so each term shows."""
    module = nn.CausalSelfAttention(D_MODEL, N_HEADS, n_kv_heads=n_kv_heads,
                                    positional=positional, key=jax.random.PRNGKey(seed))
    params, static = eqx.partition(module, eqx.is_array)
    leaves, treedef = jax.tree.flatten(params)
    leaves = [normal(seed + 100 + i, a.shape, 0.3) for i, a in enumerate(leaves)]
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)


def np_attention(x, module, n_kv_heads, *, rotate=None, bias=None):
    """Causal attention head by head in float64: query head h reads key/value head
    h // (n_heads / n_kv_heads). `rotate(x[*batch, seq, head_dim], positions)` is applied to each
    q and k head, `bias[h, i, j]` added to head h's scores."""
    x = f64(x)
    seq = x.shape[-2]
    qkv = x @ f64(module.qkv.weight) + f64(module.qkv.bias)
    heads = np.split(qkv, N_HEADS + 2 * n_kv_heads, axis=-1)
    qs, ks, vs = heads[:N_HEADS], heads[N_HEADS:N_HEADS + n_kv_heads], heads[N_HEADS + n_kv_heads:]
    positions = np.arange(seq)
    if rotate is not None:
        qs = [rotate(q, positions) for q in qs]
        ks = [rotate(k, positions) for k in ks]
    outputs = []
    for h, q in enumerate(qs):
        g = h // (N_HEADS // n_kv_heads)
        scores = q @ np.swapaxes(ks[g], -1, -2) / math.sqrt(HEAD_DIM)
        if bias is not None:
            scores = scores + bias[h]
        scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        outputs.append(p / p.sum(-1, keepdims=True) @ vs[g])
    return np.concatenate(outputs, axis=-1) @ f64(module.out.weight) + f64(module.out.bias)


# Grouped-query / multi-query attention


def test_default_attention_keeps_fused_qkv_of_width_3_d_model():
    module = nn.CausalSelfAttention(D_MODEL, N_HEADS, key=jax.random.PRNGKey(0))
    assert module.n_kv_heads == N_HEADS and module.positional is None
    assert module.qkv.weight.shape == (D_MODEL, 3 * D_MODEL)


def test_multi_head_attention_matches_numpy():
    mha = attention()
    np.testing.assert_allclose(mha(X), np_attention(X, mha, N_HEADS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [2, 1])
def test_gqa_equals_multi_head_attention_with_kv_heads_repeated_in_the_weights(n_kv_heads):
    """Query head h reads k/v head h // (N_HEADS / n_kv_heads): copying each k/v head's columns
    of the fused projection that many times gives a plain multi-head attention computing the
    same thing without any sharing."""
    gqa = attention(n_kv_heads=n_kv_heads)
    group = N_HEADS // n_kv_heads

    def repeat_kv(a):  # the last axis holds N_HEADS q heads, then n_kv_heads k and v heads each
        heads = np.split(np.asarray(a), N_HEADS + 2 * n_kv_heads, axis=-1)
        q, k, v = heads[:N_HEADS], heads[N_HEADS:N_HEADS + n_kv_heads], heads[N_HEADS + n_kv_heads:]
        return jnp.asarray(np.concatenate(q + [h for h in k for _ in range(group)]
                                          + [h for h in v for _ in range(group)], axis=-1))

    mha = attention()
    mha = eqx.tree_at(lambda m: (m.qkv.weight, m.qkv.bias, m.out), mha,
                      (repeat_kv(gqa.qkv.weight), repeat_kv(gqa.qkv.bias), gqa.out))
    assert mha.n_kv_heads == N_HEADS and mha.qkv.weight.shape == (D_MODEL, 3 * D_MODEL)
    np.testing.assert_allclose(gqa(X), mha(X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_kv_heads", [2, 1])
def test_grouped_and_multi_query_attention_match_numpy(n_kv_heads):
    module = attention(n_kv_heads=n_kv_heads)
    assert module.qkv.weight.shape == (D_MODEL, (N_HEADS + 2 * n_kv_heads) * HEAD_DIM)
    np.testing.assert_allclose(module(X), np_attention(X, module, n_kv_heads),
                               rtol=1e-5, atol=1e-5)
    # One example without a batch axis gives that example's row of the batch.
    np.testing.assert_allclose(module(X[1]), module(X)[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_kv_heads", [3, 0])
def test_attention_rejects_n_kv_heads_that_do_not_divide_n_heads(n_kv_heads):
    with pytest.raises(ValueError, match="n_kv_heads"):
        nn.CausalSelfAttention(D_MODEL, N_HEADS, n_kv_heads=n_kv_heads, key=jax.random.PRNGKey(0))


# Rotary


def np_rotary(x, positions, *, interleaved, fraction=1.0, base=10000.0):
    """RoFormer as complex numbers: channel pair i read as x_a + i x_b, multiplied by
    e^{i m theta_i} at position m."""
    x = f64(x)
    r = int(fraction * x.shape[-1])
    rot = x[..., :r]
    a, b = (rot[..., 0::2], rot[..., 1::2]) if interleaved else np.split(rot, 2, axis=-1)
    theta = base ** (-np.arange(0, r, 2) / r)
    z = (a + 1j * b) * np.exp(1j * np.multiply.outer(np.asarray(positions, np.float64), theta))
    if interleaved:
        out = np.stack([z.real, z.imag], axis=-1).reshape(rot.shape)
    else:
        out = np.concatenate([z.real, z.imag], axis=-1)
    return np.concatenate([out, x[..., r:]], axis=-1)


def per_head(np_rotate):
    """A rotation of `[seq, head_dim]` applied to `[*batch, seq, heads, head_dim]`."""
    return lambda x, positions: np.moveaxis(np_rotate(np.moveaxis(f64(x), -2, -3), positions),
                                            -3, -2)


POSITIONS = jnp.array([0, 1, 5, 6, 40, 41, 300])
ROTARY_CASES = [(False, 1.0), (True, 1.0), (False, 0.25), (True, 0.25)]


@pytest.mark.parametrize("interleaved, fraction", ROTARY_CASES)
def test_rotary_matches_complex_formulation(interleaved, fraction):
    rotary = nn.Rotary(16, fraction=fraction, interleaved=interleaved)
    q = normal(1, (2, 7, 4, 16))
    k = normal(2, (2, 5, 2, 16))
    q_rot, k_rot, bias = rotary(q, k, POSITIONS, POSITIONS[2:])
    assert bias is None
    expected = per_head(lambda x, p: np_rotary(x, p, interleaved=interleaved, fraction=fraction))
    np.testing.assert_allclose(q_rot, expected(q, POSITIONS), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(k_rot, expected(k, POSITIONS[2:]), rtol=1e-5, atol=1e-5)
    rotary_dim = int(fraction * 16)
    np.testing.assert_array_equal(q_rot[..., rotary_dim:], q[..., rotary_dim:])
    # Position 0 is the identity; every other position rotates.
    np.testing.assert_allclose(q_rot[:, 0], q[:, 0], rtol=1e-6)
    assert not np.allclose(q_rot[:, 1:, :, :rotary_dim], q[:, 1:, :, :rotary_dim], atol=1e-3)


@pytest.mark.parametrize("interleaved, fraction", ROTARY_CASES)
def test_rotary_dot_product_depends_only_on_relative_offset(interleaved, fraction):
    rotary = nn.Rotary(16, fraction=fraction, interleaved=interleaved)
    q = normal(3, (1, 1, 16))
    k = normal(4, (1, 1, 16))

    def score(m, n):
        q_rot, k_rot, _ = rotary(q, k, jnp.array([m]), jnp.array([n]))
        return float(jnp.sum(q_rot * k_rot))

    np.testing.assert_allclose(score(10, 3), score(10 + 57, 3 + 57), rtol=1e-4)
    np.testing.assert_allclose(score(3, 10), score(200, 207), rtol=1e-4)
    assert abs(score(10, 3) - score(10, 5)) > 1e-3


@pytest.mark.parametrize("head_dim, fraction", [(10, 0.5), (16, 0.0), (16, 1.5)])
def test_rotary_rejects_bad_rotary_dim(head_dim, fraction):
    with pytest.raises(ValueError, match="fraction"):
        nn.Rotary(head_dim, fraction=fraction)


def test_attention_with_rotary_matches_numpy_and_sees_only_relative_positions():
    def rotate(x, positions):
        return np_rotary(x, positions, interleaved=False, fraction=0.5)

    module = attention(n_kv_heads=2, positional=nn.Rotary(HEAD_DIM, fraction=0.5))
    np.testing.assert_allclose(module(X), np_attention(X, module, 2, rotate=rotate),
                               rtol=1e-5, atol=1e-5)
    shifted = module(X, positions=jnp.arange(SEQ) + 1000)
    np.testing.assert_allclose(shifted, module(X), rtol=1e-4, atol=1e-4)
    assert not np.allclose(module(X, positions=3 * jnp.arange(SEQ)), module(X), atol=1e-3)


# ALiBi


def official_slopes(n):
    """Press et al.'s `get_slopes`, as in github.com/ofirpress/attention_with_linear_biases."""
    def get_slopes_power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return (get_slopes_power_of_2(closest_power_of_2)
            + official_slopes(2 * closest_power_of_2)[0::2][:n - closest_power_of_2])


def test_alibi_slopes_match_paper():
    np.testing.assert_allclose(nn.alibi_slopes(8), [2.0**-k for k in range(1, 9)], rtol=1e-12)
    np.testing.assert_allclose(nn.alibi_slopes(6), official_slopes(6), rtol=1e-12)
    for n in range(1, 33):
        np.testing.assert_allclose(nn.alibi_slopes(n), official_slopes(n), rtol=1e-12)


def test_alibi_bias_matches_per_head_formula():
    q = normal(5, (2, 7, 6, 8))
    k = normal(6, (2, 4, 3, 8))
    q_pos, k_pos = POSITIONS, POSITIONS[3:]
    q_out, k_out, bias = nn.ALiBi(6)(q, k, q_pos, k_pos)
    np.testing.assert_array_equal(q_out, q)
    np.testing.assert_array_equal(k_out, k)
    slopes, q_pos, k_pos = official_slopes(6), q_pos.tolist(), k_pos.tolist()
    expected = np.array([[[-slopes[h] * (q_pos[i] - k_pos[j]) for j in range(4)]
                          for i in range(7)] for h in range(6)])
    causal = np.array(q_pos)[:, None] >= np.array(k_pos)[None, :]
    np.testing.assert_allclose(np.where(causal, bias, 0), np.where(causal, expected, 0),
                               rtol=1e-6)


def test_attend_adds_bias_before_softmax():
    q, k, v = (normal(i, (5, 2, 4)) for i in range(3))
    bias = normal(3, (2, 5, 5))
    scores = np.einsum("qhd,khd->hqk", f64(q), f64(k)) / 2 + f64(bias)
    scores = np.where(np.tril(np.ones((5, 5), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), f64(v))
    mask = nn.causal_mask(5, 5)
    np.testing.assert_allclose(nn.attend(q, k, v, mask, bias), expected, rtol=1e-5, atol=1e-6)


def test_attention_with_alibi_matches_numpy():
    module = attention(n_kv_heads=2, positional=nn.ALiBi(N_HEADS))
    i = np.arange(SEQ)
    bias = -np.asarray(official_slopes(N_HEADS))[:, None, None] * (i[:, None] - i[None, :])
    np.testing.assert_allclose(module(X), np_attention(X, module, 2, bias=bias),
                               rtol=1e-5, atol=1e-5)


# Causality and length


@pytest.mark.parametrize("positional", [nn.Rotary(HEAD_DIM, interleaved=True), nn.ALiBi(N_HEADS)])
def test_attention_with_positions_stays_causal(positional):
    module = attention(positional=positional)
    changed = X.at[:, 4:].set(normal(7, (2, SEQ - 4, D_MODEL)))
    np.testing.assert_allclose(module(changed)[:, :4], module(X)[:, :4], rtol=1e-6, atol=1e-6)
    assert not np.allclose(module(changed)[:, 4:], module(X)[:, 4:], atol=1e-3)


def alibi_gpt(vocab_size=11, block_size=8, n_layers=2):
    """GPT-2's parts by hand, with ALiBi inside attention and no position embedding."""
    keys = jax.random.split(jax.random.PRNGKey(8), 2 * n_layers + 1)
    blocks = tuple(
        nn.Block(
            attn_norm=nn.LayerNorm(D_MODEL),
            attention=nn.CausalSelfAttention(D_MODEL, N_HEADS, positional=nn.ALiBi(N_HEADS),
                                             init_std=0.3, key=keys[2 * i]),
            mlp_norm=nn.LayerNorm(D_MODEL),
            mlp=nn.MLP(D_MODEL, init_std=0.3, key=keys[2 * i + 1]),
        )
        for i in range(n_layers)
    )
    return GPT(token_embedding=nn.Embedding(vocab_size, D_MODEL, init_std=1.0, key=keys[-1]),
               position_embedding=None, blocks=blocks, final_norm=nn.LayerNorm(D_MODEL),
               head=None, embed_dropout=eqx.nn.Dropout(0.0), block_size=block_size)


def test_alibi_gpt_runs_past_block_size_and_stays_causal():
    model = eqx.filter_jit(alibi_gpt(block_size=8))
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, 11, (2, 20)), jnp.int32)
    logits = model(tokens)
    assert logits.shape == (2, 20, 11) and bool(jnp.isfinite(logits).all())
    # The first block_size positions see the same context whether or not more tokens follow.
    np.testing.assert_allclose(logits[:, :8], model(tokens[:, :8]), rtol=1e-5, atol=1e-5)
    changed = tokens.at[:, 12].set((tokens[:, 12] + 1) % 11)
    np.testing.assert_allclose(model(changed)[:, :12], logits[:, :12], rtol=1e-6, atol=1e-6)
    assert not np.allclose(model(changed)[:, 12:], logits[:, 12:], atol=1e-3)
