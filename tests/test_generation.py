"""KV-cached generation: for every architecture of the zoo, cached decoding against the full
forward, past block_size too (the sliding window, one-layer models); greedy cached sampling against
uncached sampling and against greedy loops written here (cropping, sliding, context shift);
`use_cache`; and the models the recipes build."""

import dataclasses
import functools
import importlib
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from generation_models import (
    ARCHS,
    BLOCK_SIZE,
    N_NEW,
    ONE_LAYER,
    PROMPT,
    V,
    build,
    forward,
    generate,
    greedy_cropped,
    greedy_shifted,
    last_logits,
    randomize,
)

from gptzoo.errors import GptzooError
from gptzoo.models import GPT
from gptzoo.models.protocol import can_decode
from gptzoo.recipe import load_recipe

LEARNED = ["gpt2"]
SLIDING = [name for name in ARCHS if name not in LEARNED]

decode = eqx.filter_jit(lambda model, tokens, positions, cache: model.decode(tokens, positions,
                                                                             cache))


def cached_logits(model, tokens) -> np.ndarray:
    """Logits at every position from `model.decode`: a prompt of 5 tokens and 5 of padding (the
    sampler pads prompts to a bucket) in one call, then the other tokens one at a time. The
    padding's slots, and those never written, must stay masked until real tokens fill them."""
    padding = jnp.asarray(np.random.default_rng(7).integers(0, V, 5), jnp.int32)
    first = jnp.concatenate([tokens[:5], padding])
    logits, cache = decode(model, first, jnp.arange(len(first)), model.init_cache())
    out = [logits[:5]]
    for p in range(5, len(tokens)):
        logits, cache = decode(model, tokens[p:p + 1], jnp.array([p]), cache)
        out.append(logits)
    return np.asarray(jnp.concatenate(out))


def banded_mask(window: int):
    """Causal attention restricted to the last `window` keys."""
    def mask(n_queries, n_keys, _window=None):  # the model's own window: None here
        i = jnp.arange(n_queries)[:, None] + n_keys - n_queries
        j = jnp.arange(n_keys)[None, :]
        return (j <= i) & (j > i - window)
    return mask


# Traced only under the `sliding_forward` fixture's mask, so its compilations all carry it.
_sliding_forward = eqx.filter_jit(lambda model, tokens: model(tokens))


@pytest.fixture
def sliding_forward(monkeypatch):
    """The model's own full forward over a sequence of any length, its attention masked to the
    last block_size keys: what a ring-buffer KV cache of block_size slots computes."""
    monkeypatch.setattr(importlib.import_module("gptzoo.nn.attention"), "causal_mask",
                        banded_mask(BLOCK_SIZE))
    return _sliding_forward


def greedy_sliding(model, prompt, n, sliding_forward) -> np.ndarray:
    """Greedy decoding with the sliding-window forward over the whole history, every step."""
    history = list(prompt)
    for _ in range(n):
        logits = last_logits(model, history, 3 * BLOCK_SIZE, sliding_forward)
        history.append(int(np.argmax(logits)))
    return np.array(history[len(prompt):])


# Cached decoding equals the full forward


@pytest.mark.parametrize("name", ARCHS)
def test_cached_decoding_equals_the_full_forward(name):
    model = build(name)
    assert model.cacheable and model.slides_window == (name in SLIDING)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, BLOCK_SIZE), jnp.int32)
    np.testing.assert_allclose(cached_logits(model, tokens), forward(model, tokens), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("name", SLIDING)
def test_cached_decoding_slides_its_window_past_block_size(name, sliding_forward):
    model = build(name)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, V, 3 * BLOCK_SIZE), jnp.int32)
    np.testing.assert_allclose(cached_logits(model, tokens),
                               sliding_forward(model, tokens), rtol=1e-4, atol=1e-4)


def past_block_size_cached_and_cropped(model) -> tuple[np.ndarray, np.ndarray]:
    """Logits at positions block_size..2 block_size - 1 from the cache, and from the model on
    the last block_size tokens (what `use_cache=False` computes)."""
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, V, 2 * BLOCK_SIZE), jnp.int32)
    cropped = [forward(model, tokens[p + 1 - BLOCK_SIZE:p + 1])[-1]
               for p in range(BLOCK_SIZE, 2 * BLOCK_SIZE)]
    return cached_logits(model, tokens)[BLOCK_SIZE:], np.stack(cropped)


@pytest.mark.parametrize("name", ONE_LAYER)
def test_one_layer_past_block_size_the_cache_equals_recomputing_the_window(name):
    np.testing.assert_allclose(*past_block_size_cached_and_cropped(build(name)), rtol=1e-4,
                               atol=1e-4)
    # And so the sliding cache draws the tokens that cropping and recomputing draws.
    model = build(name)
    np.testing.assert_array_equal(generate(model, [PROMPT], seeds=[5], context="slide"),
                                  generate(model, [PROMPT], seeds=[5], context="crop",
                                           use_cache=False))


# Cached against uncached sampling, and the greedy loops written above


@pytest.mark.parametrize("name", LEARNED)
def test_crop_is_nanogpts_loop_with_and_without_cache(name):
    """--context crop: the cache inside the window, then the last block_size tokens recomputed
    every token: greedy decoding is nanoGPT's loop, and one seed draws the same tokens."""
    model = build(name)
    greedy = generate(model, [PROMPT], temperature=0, context="crop")[0]
    np.testing.assert_array_equal(greedy, greedy_cropped(model, PROMPT, N_NEW))
    np.testing.assert_array_equal(greedy, generate(model, [PROMPT], temperature=0,
                                                   context="crop", use_cache=False)[0])
    # Random models' greedy text soon repeats one or two tokens; sampled text does not.
    np.testing.assert_array_equal(generate(model, [PROMPT], seeds=[5], context="crop"),
                                  generate(model, [PROMPT], seeds=[5], context="crop",
                                           use_cache=False))


@pytest.mark.parametrize("name", SLIDING)
def test_sliding_models_decode_a_sliding_window_with_cache_and_crop_without(name,
                                                                            sliding_forward):
    """With the cache, greedy decoding of rotary/ALiBi models is the loop over the sliding-window
    forward; without it, nanoGPT's loop over the last block_size tokens at positions 0..; the
    two agree while the context fits in block_size."""
    model = build(name)
    cached = generate(model, [PROMPT], temperature=0, context="slide")[0]
    uncached = generate(model, [PROMPT], temperature=0, context="crop", use_cache=False)[0]
    np.testing.assert_array_equal(cached, greedy_sliding(model, PROMPT, N_NEW, sliding_forward))
    np.testing.assert_array_equal(uncached, greedy_cropped(model, PROMPT, N_NEW))
    fits = BLOCK_SIZE - len(PROMPT) + 1  # tokens at positions up to block_size
    np.testing.assert_array_equal(cached[:fits], uncached[:fits])


# Context shift (the default): re-encode the window's last part once it is full


@pytest.mark.parametrize("name", ARCHS)
def test_context_shift_equals_reprefilling_the_kept_tokens_by_full_forwards(name):
    model = build(name)
    np.testing.assert_array_equal(generate(model, [PROMPT], temperature=0)[0],
                                  greedy_shifted(model, PROMPT, N_NEW))


@pytest.mark.parametrize("keep", [0.25, 0.8])
def test_context_shift_keeps_the_fraction_asked_for_with_and_without_cache(keep):
    model = build("llama")
    greedy = generate(model, [PROMPT], temperature=0, keep=keep)[0]
    np.testing.assert_array_equal(greedy, greedy_shifted(model, PROMPT, N_NEW, keep))
    np.testing.assert_array_equal(generate(model, [PROMPT], seeds=[5], keep=keep),
                                  generate(model, [PROMPT], seeds=[5], keep=keep,
                                           use_cache=False))


def test_slide_is_refused_for_learned_positions():
    with pytest.raises(GptzooError, match="learned positions"):
        generate(build("gpt2"), [PROMPT], context="slide")


def test_use_cache_true_decodes_and_false_recomputes():
    """A model whose one-token `decode` steps are made wrong (its prefill is right): the cached
    text follows them, the uncached text does not."""
    model = build("llama")

    class WrongDecode(GPT):
        def decode(self, tokens, positions, cache):
            logits, cache = super().decode(tokens, positions, cache)
            return (-logits if tokens.shape[0] == 1 else logits), cache

    wrong = WrongDecode(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model)})
    expected = greedy_shifted(model, PROMPT, N_NEW)
    np.testing.assert_array_equal(generate(wrong, [PROMPT], temperature=0, use_cache=False)[0],
                                  expected)
    assert (generate(wrong, [PROMPT], temperature=0)[0] != expected).any()


# The models the recipes build (tiny overrides)

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.py"))
TINY_MODEL = {"model.n_layers": "2", "model.d_model": "32", "model.n_heads": "4",
              "model.block_size": str(BLOCK_SIZE), "model.dropout": "0.0"}


@functools.cache
def recipe_model(path: Path):
    recipe = load_recipe(path, {**TINY_MODEL, **({"model.n_latents": "8"} if "perceiver" in
                                                  path.name else {})})
    return randomize(recipe.build(V, key=jax.random.PRNGKey(0)), 3)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_models_decode_like_their_full_forward(path):
    model = recipe_model(path)
    if not can_decode(model):
        assert "perceiver" in path.name  # the one architecture sampled without a cache
        pytest.skip("Perceiver AR has no cache (docs/generation.md says why)")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, BLOCK_SIZE), jnp.int32)
    np.testing.assert_allclose(cached_logits(model, tokens), forward(model, tokens), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(generate(model, [PROMPT], temperature=0)[0],
                                  greedy_shifted(model, PROMPT, N_NEW))
