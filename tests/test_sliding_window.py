"""Sliding-window attention (`window=W`): every attention path against a float64 NumPy reference
written with explicit loops over the visible keys, and its gradients against finite differences
of that reference; the mask against transformers' own; the block path's cost growing with
T * W; the rolling KV cache (token by token, a prompt longer than the window, chunks across the
ring's wrap, padding) against the full band-masked forward; and the sampler over it."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import MistralConfig
from transformers.masking_utils import (
    create_sliding_window_causal_mask,
    sliding_window_causal_mask_function,
)

from gptzoo import nn
from gptzoo.models import GPT
from gptzoo.nn import attention
from gptzoo.sample import generate_tokens


def draws(seed, *shapes, scale=1.0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(scale * rng.standard_normal(s), jnp.float32) for s in shapes]


def np_window_attention(q, k, v, window, bias=None):
    """float64 attention of the last `n_q` positions over `n_k` keys: the query at position p
    reads key j when `j <= p` and `p - j < window` (every `j <= p` when window is None); query
    head h reads key/value head `h // (heads // kv_heads)`."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    n_q, heads, dim = q.shape[-3:]
    n_k, kv_heads = k.shape[-3:-1]
    out = np.zeros(q.shape)
    for h in range(heads):
        g = h // (heads // kv_heads)
        for i in range(n_q):
            p = i + n_k - n_q
            seen = [j for j in range(n_k) if j <= p and (window is None or p - j < window)]
            scores = np.einsum("...d,...jd->...j", q[..., i, h, :], k[..., seen, g, :])
            scores = scores / math.sqrt(dim)
            if bias is not None:
                scores = scores + np.asarray(bias, np.float64)[h, i, seen]
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            out[..., i, h, :] = np.einsum("...j,...jd->...d", weights, v[..., seen, g, :])
    return out


CASES = {  # (batch, n_queries, n_keys, heads, kv_heads, window, ALiBi bias)
    "einsum path": ((2,), 40, 40, 2, 2, 7, False),
    "blocks, window not a multiple of the block": ((), 160, 160, 4, 2, 50, False),
    "blocks, window of 1": ((), 130, 130, 2, 1, 1, False),
    "blocks, window past the sequence": ((), 130, 130, 2, 2, 200, False),
    "blocks, ALiBi bias": ((), 140, 140, 2, 2, 70, True),
    "blocks, fewer queries than keys": ((), 130, 150, 2, 2, 30, False),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_banded_attention_matches_float64_reference(case):
    batch, n_q, n_k, heads, kv_heads, window, with_bias = case
    expected_path = "blocks" if n_q >= attention.MIN_BLOCKED_QUERIES else "einsum"
    assert attention.attention_path("cpu", jnp.float32, n_queries=n_q, n_keys=n_k,
                                    bias=with_bias, dropout=False) == expected_path
    q, k, v = draws(0, (*batch, n_q, heads, 8), (*batch, n_k, kv_heads, 8),
                    (*batch, n_k, kv_heads, 8))
    bias = None
    if with_bias:
        positions = jnp.arange(n_k)
        _, _, bias = nn.ALiBi(heads)(q, k, positions[n_k - n_q:], positions)
    out = jax.jit(lambda q, k, v: nn.causal_attend(q, k, v, bias, window=window))(q, k, v)
    np.testing.assert_allclose(out, np_window_attention(q, k, v, window, bias), atol=2e-5)


def test_cudnn_call_asks_for_the_same_window(monkeypatch):
    """The cuDNN path's call, run by `jax.nn.dot_product_attention`'s XLA implementation (whose
    `local_window_size` the cuDNN one mirrors), gives the reference's window."""
    run = jax.nn.dot_product_attention
    monkeypatch.setattr(attention, "attention_path", lambda *args, **kwargs: "cudnn")
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *args, implementation, **kwargs: run(*args, **kwargs,
                                                                    implementation="xla"))
    q, k, v = draws(12, (2, 30, 4, 8), (2, 30, 2, 8), (2, 30, 2, 8))
    np.testing.assert_allclose(nn.causal_attend(q, k, v, window=7),
                               np_window_attention(q, k, v, 7), atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's kernel needs a GPU")
def test_cudnn_path_applies_the_window():
    """bfloat16 through cuDNN's kernel (`local_window_size`) against the float64 reference, and
    its gradients against the float32 einsum path's."""
    assert attention.attention_path("gpu", jnp.bfloat16, n_queries=256, n_keys=256, bias=False,
                                    dropout=False) == "cudnn"
    q, k, v, ct = draws(11, (2, 256, 4, 64), (2, 256, 2, 64), (2, 256, 2, 64), (2, 256, 4, 64))
    half = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    out = jax.jit(lambda q, k, v: nn.causal_attend(q, k, v, window=100))(*half)
    np.testing.assert_allclose(out.astype(jnp.float32), np_window_attention(*half, 100),
                               atol=3e-2)

    def loss(q, k, v):
        return jnp.sum(nn.causal_attend(q, k, v, window=100).astype(jnp.float32) * ct)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*half)
    want = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for grad, expected in zip(grads, want, strict=True):
        scale = float(jnp.abs(expected).max())
        np.testing.assert_allclose(grad.astype(jnp.float32) / scale, expected / scale, atol=3e-2)


def test_window_as_wide_as_the_sequence_is_full_causal_attention():
    q, k, v = draws(1, (30, 2, 8), (30, 2, 8), (30, 2, 8))
    np.testing.assert_allclose(nn.causal_attend(q, k, v, window=30), nn.causal_attend(q, k, v),
                               atol=1e-6)


@pytest.mark.parametrize("n_queries", [12, 10], ids=["self", "fewer queries than keys"])
def test_gradients_match_finite_differences_of_the_reference(n_queries, monkeypatch):
    """Blocks of 3 queries from 2 up, so the block path skips keys on a tiny case: the
    derivative along a random direction against central differences of the float64 reference."""
    monkeypatch.setattr(attention, "BLOCK", 3)
    monkeypatch.setattr(attention, "MIN_BLOCKED_QUERIES", 2)
    window = 4
    q, k, v, dq, dk, dv = draws(2, *[(n_queries, 2, 4), (12, 1, 4), (12, 1, 4)] * 2)
    ct = draws(3, (n_queries, 2, 4))[0]

    def loss(q, k, v):
        return jnp.sum(nn.causal_attend(q, k, v, window=window) * ct)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    along = sum(float(jnp.sum(g * d)) for g, d in zip(grads, (dq, dk, dv), strict=True))

    def reference(t):
        moved = [np.asarray(a, np.float64) + t * np.asarray(d, np.float64)
                 for a, d in zip((q, k, v), (dq, dk, dv), strict=True)]
        return float(np.sum(np_window_attention(*moved, window) * np.asarray(ct, np.float64)))

    eps = 1e-5
    assert along == pytest.approx((reference(eps) - reference(-eps)) / (2 * eps), rel=1e-4)


# The mask against transformers'


@pytest.mark.parametrize("window", [1, 3, 12, 20])
def test_mask_matches_transformers_sliding_window_mask_function(window):
    theirs = sliding_window_causal_mask_function(window)
    expected = np.array([[bool(theirs(0, 0, torch.tensor(i), torch.tensor(j))) for j in range(12)]
                         for i in range(12)])
    np.testing.assert_array_equal(nn.causal_mask(12, 12, window), expected)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_mask_matches_the_masks_transformers_builds_for_mistral(implementation):
    """The 4-D masks Mistral's eager and sdpa attention receive (the back-ends that disagreed
    upstream by one position: transformers issues #29623, #39408)."""
    config = MistralConfig(hidden_size=16, num_attention_heads=2, sliding_window=5,
                           attn_implementation=implementation)
    built = create_sliding_window_causal_mask(config, torch.zeros(1, 12, 16), None, None,
                                              position_ids=torch.arange(12)[None],
                                              allow_is_causal_skip=False)
    seen = built[0, 0].numpy()
    seen = seen if seen.dtype == bool else seen == 0  # eager: 0 where seen, -inf elsewhere
    np.testing.assert_array_equal(nn.causal_mask(12, 12, 5), seen)


def dot_flops(seq, window):
    q = jnp.zeros((seq, 2, 16))
    lowered = jax.jit(lambda q, k, v: nn.causal_attend(q, k, v, window=window)).lower(q, q, q)
    return lowered.cost_analysis()["flops"]


def test_block_path_cost_grows_with_seq_times_window_not_seq_squared():
    full = dot_flops(1024, None) / dot_flops(512, None)
    banded = dot_flops(1024, 128) / dot_flops(512, 128)
    assert full > 3.5 and banded < 2.3
    assert dot_flops(1024, 128) < dot_flops(1024, None) / 2.5


# The rolling KV cache


def windowed(window=5, positional=None, **kwargs):
    return nn.CausalSelfAttention(32, 4, n_kv_heads=2, window=window,
                                  positional=positional or nn.Rotary(8), init_std=0.3,
                                  key=jax.random.PRNGKey(4), **kwargs)


decode = eqx.filter_jit(lambda module, x, positions, cache: module.decode(x, positions, cache))
forward = eqx.filter_jit(lambda module, x: module(x))


def decode_in_chunks(module, x, bounds, size):
    cache, out = module.init_cache(size), []
    for start, stop in bounds:
        y, cache = decode(module, x[start:stop], jnp.arange(start, stop), cache)
        out.append(y)
    return jnp.concatenate(out), cache


CHUNKINGS = {
    "token by token": [(t, t + 1) for t in range(24)],
    "a prompt longer than the window, then tokens": [(0, 13)] + [(t, t + 1) for t in range(13, 24)],
    "chunks across the ring's wrap": [(0, 3), (3, 7), (7, 10), (10, 14), (14, 24)],
}


@pytest.mark.parametrize("bounds", CHUNKINGS.values(), ids=CHUNKINGS.keys())
@pytest.mark.parametrize("positional", [nn.Rotary(8), nn.ALiBi(4)], ids=["rotary", "alibi"])
def test_rolling_cache_decoding_equals_band_masked_forward(bounds, positional):
    module = windowed(positional=positional)
    (x,) = draws(5, (24, 32))
    stepped, cache = decode_in_chunks(module, x, bounds, size=64)
    assert cache.size == 5  # the window, not the 64 positions asked for
    np.testing.assert_allclose(stepped, forward(module, x), atol=1e-5)


def test_padding_at_negative_positions_is_neither_seen_nor_cached():
    """A prompt of 7 right-padded to 16, the padding at position -1, in a cache of 5 slots: the
    prompt's last 5 keys stay, and decoding goes on as without padding."""
    module = windowed()
    (x,) = draws(6, (16, 32))
    padded = jnp.concatenate([x[:7], draws(7, (9, 32))[0]])
    positions = jnp.where(jnp.arange(16) < 7, jnp.arange(16), -1)
    y, cache = decode(module, padded, positions, module.init_cache(64))
    np.testing.assert_array_equal(np.sort(cache.positions), np.arange(2, 7))
    rest, _ = decode(module, x[7:], jnp.arange(7, 16), cache)
    np.testing.assert_allclose(jnp.concatenate([y[:7], rest]), forward(module, x), atol=1e-5)
    assert np.isfinite(np.asarray(y)).all()


def test_cache_wider_than_the_window_still_shows_only_the_window():
    module = windowed()
    (x,) = draws(8, (12, 32))
    wide = nn.kv_cache.KVCache.empty(32, 2, 8)
    y, cache = decode(module, x[:9], jnp.arange(9), wide)
    rest, _ = decode(module, x[9:], jnp.arange(9, 12), cache)
    np.testing.assert_allclose(jnp.concatenate([y, rest]), forward(module, x), atol=1e-5)


def test_cache_narrower_than_the_window_slides_as_a_full_attention_cache_does():
    """Asked for 6 slots, a window of 100 keeps 6: decoding then equals a window of 6, and a
    prefill longer than the cache is refused, as without a window."""
    (x,) = draws(9, (14, 32))
    narrow, full = windowed(window=100), windowed(window=None)
    assert narrow.init_cache(6).size == full.init_cache(6).size == 6
    stepped, _ = decode_in_chunks(narrow, x, [(t, t + 1) for t in range(14)], size=6)
    np.testing.assert_allclose(stepped, forward(windowed(window=6), x), atol=1e-5)
    for module in (narrow, full):
        with pytest.raises(ValueError, match="do not fit a KV cache of 4"):
            module.decode(jnp.zeros((5, 32)), jnp.arange(5), module.init_cache(4))


@pytest.mark.parametrize("window", [0, -3, 2.5])
def test_attention_rejects_a_window_that_is_not_a_positive_integer(window):
    with pytest.raises(ValueError, match="must be a positive number of positions"):
        windowed(window=window)


# The sampler over the rolling cache

V, BLOCK_SIZE, WINDOW = 23, 32, 6


def windowed_gpt():
    """Two blocks of windowed rotary attention, every weight redrawn from N(0, 0.5^2) so that
    the tokens attended to move the logits."""
    keys = jax.random.split(jax.random.PRNGKey(8), 3)
    blocks = tuple(nn.Block(attn_norm=nn.RMSNorm(32), attention=windowed(WINDOW),
                            mlp_norm=nn.RMSNorm(32), mlp=nn.MLP(32, key=k)) for k in keys[:2])
    model = GPT(token_embedding=nn.Embedding(V, 32, key=keys[2]), position_embedding=None,
                blocks=blocks, final_norm=nn.RMSNorm(32), head=None,
                embed_dropout=eqx.nn.Dropout(0.0), block_size=BLOCK_SIZE)
    params, static = eqx.partition(model, eqx.is_array)
    rng = np.random.default_rng(10)
    params = jax.tree.map(lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), a.dtype),
                          params)
    return eqx.combine(params, static)


def test_sampler_slides_the_rolling_cache_as_the_band_masked_forward_predicts():
    """Greedy generation past block_size, prompt padded to a bucket wider than the window, against
    greedy steps of the full band-masked forward over the whole history."""
    model = windowed_gpt()
    prompt = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5])
    n_new = 2 * BLOCK_SIZE
    out = np.concatenate(list(generate_tokens(model, [prompt], max_new_tokens=n_new,
                                              temperature=0, context="slide")), 1)[0]
    forward = jax.jit(lambda tokens: model(tokens))
    history = list(prompt) + [0] * n_new
    for t in range(n_new):
        logits = forward(jnp.asarray(history, jnp.int32))[len(prompt) + t - 1]
        history[len(prompt) + t] = int(np.argmax(logits))
    np.testing.assert_array_equal(out, history[len(prompt):])
