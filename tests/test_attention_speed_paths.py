"""The attention paths `attention_path` picks: the block-causal path (each query block reads keys up
to its own diagonal only) against a float64 NumPy softmax attention written out with its gradients
by hand; the float32 softmax under bfloat16 inputs; the selection rule itself; and, on a GPU only,
cuDNN's fused kernel against the same reference."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from gptzoo import nn
from gptzoo.nn import attention

BF16_TOLERANCE = 3e-2  # bfloat16 keeps 8 significant bits: ~0.4% per rounding, a few roundings


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 3 queries from 2 queries up, so short sequences take the block-causal path."""
    monkeypatch.setattr(attention, "BLOCK", 3)
    monkeypatch.setattr(attention, "MIN_BLOCKED_QUERIES", 2)


def draws(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


def np_attention_and_grads(q, k, v, bias, cotangent):
    """float64 causal softmax attention of the last q positions over k, per query head (head h
    reads kv head h // group), and the gradients of sum(output * cotangent) by hand."""
    q, k, v, ct = (np.asarray(a, np.float64) for a in (q, k, v, cotangent))
    n_q, heads, dim = q.shape[-3:]
    n_k, kv_heads = k.shape[-3], k.shape[-2]
    group, scale = heads // kv_heads, 1 / math.sqrt(dim)
    allowed = np.arange(n_q)[:, None] + n_k - n_q >= np.arange(n_k)[None, :]
    out, dq = np.zeros_like(q), np.zeros_like(q)
    dk, dv = np.zeros_like(k), np.zeros_like(v)
    for h in range(heads):
        g = h // group
        qh, kh, vh, cth = q[..., h, :], k[..., g, :], v[..., g, :], ct[..., h, :]
        scores = qh @ np.swapaxes(kh, -1, -2) * scale
        if bias is not None:
            scores = scores + np.asarray(bias[h], np.float64)
        scores = np.where(allowed, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
        out[..., h, :] = p @ vh
        dp = cth @ np.swapaxes(vh, -1, -2)
        ds = p * (dp - (dp * p).sum(-1, keepdims=True))
        dq[..., h, :] = ds @ kh * scale
        dk[..., g, :] += np.swapaxes(ds, -1, -2) @ qh * scale
        dv[..., g, :] += np.swapaxes(p, -1, -2) @ cth
    return out, (dq, dk, dv)


CASES = {  # (batch, n_queries, n_keys, heads, kv_heads, head_dim, bias)
    "seq not divisible by the block": ((2,), 7, 7, 2, 2, 4, False),
    "seq divisible by the block": ((), 9, 9, 2, 2, 4, False),
    "grouped-query heads": ((2,), 8, 8, 4, 2, 4, False),
    "ALiBi bias": ((2,), 7, 7, 4, 4, 4, True),
    "fewer queries than keys (Perceiver AR)": ((2,), 5, 11, 2, 1, 4, False),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_block_causal_path_matches_float64_reference_and_its_gradients(case, small_blocks):
    batch, n_q, n_k, heads, kv_heads, dim, with_bias = case
    assert attention.attention_path("cpu", jnp.float32, n_queries=n_q, n_keys=n_k,
                                    bias=with_bias, dropout=False) == "blocks"
    q, k, v, ct = draws(0, (*batch, n_q, heads, dim), (*batch, n_k, kv_heads, dim),
                        (*batch, n_k, kv_heads, dim), (*batch, n_q, heads, dim))
    bias = None
    if with_bias:
        positions = jnp.arange(n_k)
        _, _, bias = nn.ALiBi(heads)(q, k, positions[n_k - n_q:], positions)
    expected, expected_grads = np_attention_and_grads(q, k, v, bias, ct)

    def loss(q, k, v):
        return jnp.sum(nn.causal_attend(q, k, v, bias) * ct)

    np.testing.assert_allclose(nn.causal_attend(q, k, v, bias), expected, rtol=1e-5, atol=1e-5)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for grad, want in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5)


def test_block_causal_dropout_drops_weights_and_keeps_causality(small_blocks):
    q, k, v = draws(1, (7, 2, 4), (7, 2, 4), (7, 2, 4))
    dropout = eqx.nn.Dropout(0.5)
    out = nn.causal_attend(q, k, v, dropout=dropout, key=jax.random.PRNGKey(0))
    assert not np.allclose(out, nn.causal_attend(q, k, v), atol=1e-3)
    changed = nn.causal_attend(q, k.at[5:].set(0.0), v.at[5:].set(9.0), dropout=dropout,
                               key=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(changed[:5], out[:5])  # same masks, no look-ahead
    np.testing.assert_array_equal(nn.causal_attend(q, k, v, dropout=dropout),
                                  nn.causal_attend(q, k, v))  # no key: inference


@pytest.mark.parametrize("window", [None, 4])
def test_block_path_gradients_with_dropout_and_bias_match_finite_differences(window,
                                                                              small_blocks):
    """The block path's own backward pass, for q, k, v and the bias, under dropout (the same
    masks at every evaluation: a fixed key), against central differences of its forward."""
    q, k, v, bias = draws(8, (2, 7, 2, 4), (2, 7, 1, 4), (2, 7, 1, 4), (2, 7, 7))
    dropout = eqx.nn.Dropout(0.3)

    def attend(*arrays):  # check_grads evaluates it on NumPy arrays too
        q, k, v, bias = map(jnp.asarray, arrays)
        return nn.causal_attend(q, k, v, bias, window=window, dropout=dropout,
                                key=jax.random.PRNGKey(1))

    jax.test_util.check_grads(attend, (q, k, v, bias), order=1, modes=("rev",), eps=1e-2,
                              atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("positional", [None, nn.ALiBi(4), nn.Rotary(8)])
def test_block_causal_forward_equals_cached_decoding(positional, small_blocks):
    module = nn.CausalSelfAttention(32, 4, n_kv_heads=2, positional=positional,
                                    init_std=0.3, key=jax.random.PRNGKey(3))
    (x,) = draws(2, (8, 32))
    full = module(x)
    cache, stepped = module.init_cache(8), []
    for start, stop in [(0, 3), (3, 4), (4, 8)]:  # a prompt, then one and several positions
        y, cache = module.decode(x[start:stop], jnp.arange(start, stop), cache)
        stepped.append(y)
    np.testing.assert_allclose(jnp.concatenate(stepped), full, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's kernel needs a GPU")
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2)], ids=["multi-head", "grouped"])
def test_cudnn_path_matches_float64_reference_and_its_gradients(heads, kv_heads):
    # On an H100 (jax 0.11.2), 4 x 1,024 positions of 12 heads: output within 0.009 of float64
    # where the bf16 einsum path is within 0.013; gradients within 1% of the einsum path's.
    assert attention.attention_path("gpu", jnp.bfloat16, n_queries=256, n_keys=256, bias=False,
                                    dropout=False) == "cudnn"
    q, k, v, ct = (a.astype(jnp.bfloat16) for a in draws(
        6, (2, 256, heads, 64), (2, 256, kv_heads, 64), (2, 256, kv_heads, 64),
        (2, 256, heads, 64)))
    expected, expected_grads = np_attention_and_grads(q, k, v, None, ct)

    def loss(q, k, v):
        return jnp.sum(nn.causal_attend(q, k, v).astype(jnp.float32) * ct.astype(jnp.float32))

    out = jax.jit(nn.causal_attend)(q, k, v)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), expected, atol=BF16_TOLERANCE)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for grad, want in zip(grads, expected_grads, strict=True):
        scale = np.abs(want).max()
        np.testing.assert_allclose(grad.astype(jnp.float32) / scale, want / scale,
                                   atol=BF16_TOLERANCE)


# bfloat16 inputs


@pytest.mark.parametrize("path_blocks", [False, True], ids=["einsum", "blocks"])
def test_bfloat16_inputs_give_bfloat16_output_near_float64(path_blocks, monkeypatch):
    if path_blocks:
        monkeypatch.setattr(attention, "BLOCK", 3)
        monkeypatch.setattr(attention, "MIN_BLOCKED_QUERIES", 2)
    q, k, v = (a.astype(jnp.bfloat16) for a in draws(4, (2, 7, 4, 8), (2, 7, 2, 8), (2, 7, 2, 8)))
    positions = jnp.arange(7)
    _, _, bias = nn.ALiBi(4)(q, k, positions, positions)
    out = nn.causal_attend(q, k, v, bias)
    assert out.dtype == jnp.bfloat16
    expected, _ = np_attention_and_grads(q, k, v, bias, np.zeros(q.shape))
    np.testing.assert_allclose(out.astype(jnp.float32), expected, atol=BF16_TOLERANCE)


def test_attention_weights_are_float32_for_bfloat16_inputs():
    q, k = (a.astype(jnp.bfloat16) for a in draws(5, (6, 2, 8), (6, 2, 8)))
    weights = nn.attention.attention_weights(q, k, nn.causal_mask(6, 6))
    assert weights.dtype == jnp.float32
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)


def test_bfloat16_module_and_bfloat16_cache_decode_in_bfloat16():
    module = nn.CausalSelfAttention(32, 4, n_kv_heads=2, positional=nn.ALiBi(4), init_std=0.3,
                                    key=jax.random.PRNGKey(6))
    (x,) = draws(7, (6, 32))
    reference = module(x)
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if eqx.is_inexact_array(a) else a, module)
    full = half(x.astype(jnp.bfloat16))
    y, cache = half.decode(x.astype(jnp.bfloat16), jnp.arange(6), half.init_cache(6))
    assert full.dtype == y.dtype == cache.k.dtype == cache.v.dtype == jnp.bfloat16
    np.testing.assert_allclose(full.astype(jnp.float32), reference, atol=BF16_TOLERANCE)
    np.testing.assert_allclose(y.astype(jnp.float32), reference, atol=BF16_TOLERANCE)


# The selection rule


@pytest.mark.parametrize(("platform", "dtype", "n_queries", "n_keys", "bias", "dropout", "path"), [
    ("gpu", jnp.bfloat16, 256, 256, False, False, "cudnn"),
    ("gpu", jnp.float16, 64, 64, False, False, "cudnn"),
    ("gpu", jnp.float32, 256, 256, False, False, "einsum"),  # cuDNN's kernel is half precision
    ("gpu", jnp.bfloat16, 256, 256, True, False, "einsum"),  # ALiBi's bias
    ("gpu", jnp.bfloat16, 256, 256, False, True, "einsum"),  # attention dropout
    ("gpu", jnp.bfloat16, 64, 256, False, False, "einsum"),  # Perceiver AR's offset mask
    ("cpu", jnp.float32, 256, 256, True, True, "blocks"),
    ("cpu", jnp.bfloat16, 128, 128, False, False, "blocks"),
    ("cpu", jnp.float32, 64, 64, False, False, "einsum"),  # one block would be the whole matrix
    ("tpu", jnp.bfloat16, 256, 256, False, False, "einsum"),
])
def test_attention_path_selection(platform, dtype, n_queries, n_keys, bias, dropout, path):
    assert attention.attention_path(platform, dtype, n_queries=n_queries, n_keys=n_keys,
                                    bias=bias, dropout=dropout) == path
