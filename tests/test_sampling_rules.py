"""The sampling rules (top-k, top-p, temperature) against NumPy, over 2000 draws of one set of
logits; and each sampled token against a categorical draw from its row's key and step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from generation_models import BLOCK_SIZE, PROMPT, V, build, forward, generate

from gptzoo.sample import sample_logits

# Sampling rules

LOGITS = jnp.asarray(np.random.default_rng(4).normal(0, 2, 50), jnp.float32)
KEYS = jax.random.split(jax.random.PRNGKey(0), 2000)


def draws(logits, temperature, **kwargs) -> np.ndarray:
    return np.asarray(jax.vmap(lambda k: sample_logits(logits, k, temperature, **kwargs))(KEYS))


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def assert_frequencies_match(tokens, probs):
    """Each token's frequency within 0.04 of `probs` (2000 draws: under 4 standard errors)."""
    frequencies = np.bincount(tokens, minlength=len(probs)) / len(tokens)
    np.testing.assert_allclose(frequencies, probs, atol=0.04)


def test_top_k_only_emits_the_k_most_likely_tokens():
    top5 = np.argsort(-np.asarray(LOGITS, np.float64))[:5]
    tokens = draws(LOGITS, 0.8, top_k=5)
    assert set(tokens.tolist()) == set(top5.tolist())
    restricted = np.full(50, -np.inf)
    restricted[top5] = np.asarray(LOGITS, np.float64)[top5] / 0.8
    assert_frequencies_match(tokens, np_softmax(restricted))


@pytest.mark.parametrize("top_p, temperature", [(0.5, 1.0), (0.9, 0.7), (0.3, 2.0)])
def test_top_p_only_emits_the_smallest_nucleus(top_p, temperature):
    probs = np_softmax(np.asarray(LOGITS, np.float64) / temperature)
    order = np.argsort(-probs)
    # The fewest most-likely tokens whose probabilities sum to top_p or more.
    size = int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)
    nucleus = order[:size]
    assert size > 1
    tokens = draws(LOGITS, temperature, top_p=top_p)
    assert set(tokens.tolist()) == set(nucleus.tolist())
    renormalized = np.zeros(50)
    renormalized[nucleus] = probs[nucleus] / probs[nucleus].sum()
    assert_frequencies_match(tokens, renormalized)


def test_a_nucleus_that_needs_every_token_keeps_every_token():
    """top_p just below 1 runs the nucleus; every token is needed to reach it, the least likely
    (whose predecessors hold less than top_p) included, so the draws are the unrestricted ones."""
    flat = jnp.asarray(np.random.default_rng(5).normal(0, 0.3, 8), jnp.float32)
    probs = np_softmax(np.asarray(flat, np.float64))
    top_p = 1 - probs.min() / 2
    np.testing.assert_array_equal(draws(flat, 1.0, top_p=top_p), draws(flat, 1.0))
    assert_frequencies_match(draws(flat, 1.0), probs)


@pytest.mark.parametrize("top_k", [V, V + 5])
def test_top_k_of_the_whole_vocabulary_or_more_is_no_limit(top_k):
    np.testing.assert_array_equal(draws(LOGITS[:V], 1.0, top_k=top_k), draws(LOGITS[:V], 1.0))


def test_top_k_and_top_p_together_keep_the_intersection():
    tokens = draws(LOGITS, 1.0, top_k=3, top_p=0.99)
    assert set(tokens.tolist()) == set(np.argsort(-np.asarray(LOGITS))[:3].tolist())


def test_each_sampled_token_is_a_categorical_draw_from_its_rows_key_and_step():
    """Token t of a row is `jax.random.categorical(fold_in(PRNGKey(seed), t), logits)` of the
    full forward's logits: the noise the decode loop draws ahead of its loop is those draws."""
    model, seed = build("gpt2"), 5
    context = list(PROMPT[:3])
    tokens = generate(model, [np.array(context)], n=BLOCK_SIZE - 3, seeds=[seed])[0]
    for t, token in enumerate(tokens):
        logits = forward(model, jnp.asarray(context))[-1]
        key = jax.random.fold_in(jax.random.PRNGKey(seed), t)
        assert token == int(jax.random.categorical(key, logits)), f"token {t}"
        context.append(int(token))


def test_temperature_0_is_argmax_and_top_k_1_is_greedy():
    rng = np.random.default_rng(6)
    for seed in range(5):
        logits = jnp.asarray(rng.normal(0, 1, 50), jnp.float32)
        key = jax.random.PRNGKey(seed)
        assert int(sample_logits(logits, key, 0.0)) == int(np.argmax(logits))
        assert int(sample_logits(logits, key, 1.0, top_k=1)) == int(np.argmax(logits))
        assert int(sample_logits(logits, key, 5.0, top_k=1, top_p=0.1)) == int(np.argmax(logits))
