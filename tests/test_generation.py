"""KV-cached generation: for every architecture of the zoo, cached decoding against the full
forward, greedy cached sampling against uncached sampling and against greedy loops written here,
batching, seeds; the sampling rules (top-k, top-p, temperature) against NumPy; the uncached
fallback for models that cannot cache; and that prompt lengths in one bucket share a compilation."""

import dataclasses
import functools
import gc
import importlib
import types
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptzoo import nn
from gptzoo.errors import GptzooError
from gptzoo.models import GPT, gpt2
from gptzoo.models.protocol import can_decode
from gptzoo.nn.rowwise import MIN_ROWS
from gptzoo.recipe import load_recipe
from gptzoo.sample import decode_chunk, generate_tokens, layout, loop, prefill, sample_logits
from gptzoo.sample.programs import merge_rows

V, D_MODEL, N_HEADS, BLOCK_SIZE = 29, 32, 4, 16
HEAD_DIM = D_MODEL // N_HEADS
N_NEW = 40  # past block_size: prompts of 5 tokens end at position 44, almost 3 windows


def randomize(model, seed, scale=0.5):
    """Every array redrawn from N(0, scale^2) (NumPy's draws: each new shape jax.random compiles
    costs ~1 s), so attention, biases and norm scales all move the logits."""
    params, static = eqx.partition(model, eqx.is_array)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype) for a in leaves]
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)


def compose(positional=None, *, n_kv_heads=None, learned=False, parallel=None, llama=False,
            mlp=None, head_qk=False, n_layers=2, seed=0) -> GPT:
    """A GPT assembled by hand from the zoo's parts, with random weights."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 2 * n_layers + 3)

    def norm():
        return nn.RMSNorm(D_MODEL) if llama else nn.LayerNorm(D_MODEL)

    def block(attn_key, mlp_key):
        attention = nn.CausalSelfAttention(D_MODEL, N_HEADS, n_kv_heads=n_kv_heads,
                                           positional=positional, key=attn_key)
        if mlp is not None:
            ff = mlp(mlp_key)
        elif llama:
            ff = nn.GLUMLP(D_MODEL, multiple_of=16, key=mlp_key)
        else:
            ff = nn.MLP(D_MODEL, key=mlp_key)
        if parallel == "gpt-j":
            return nn.ParallelBlock(attn_norm=norm(), attention=attention, mlp=ff)
        if parallel == "neox":
            return nn.ParallelBlock(attn_norm=norm(), attention=attention, mlp=ff,
                                    mlp_norm=norm())
        return nn.Block(attn_norm=norm(), attention=attention, mlp_norm=norm(), mlp=ff)

    model = GPT(
        token_embedding=nn.Embedding(V, D_MODEL, key=keys[-1]),
        position_embedding=(nn.PositionalEmbedding(BLOCK_SIZE, D_MODEL, key=keys[-2])
                            if learned else None),
        blocks=tuple(block(keys[2 * i], keys[2 * i + 1]) for i in range(n_layers)),
        final_norm=norm(),
        head=None,
        embed_dropout=eqx.nn.Dropout(0.0),
        block_size=BLOCK_SIZE,
        head_qk=nn.HeadQK(D_MODEL, V, d_qk=16, key=keys[-3]) if head_qk else None,
    )
    return randomize(model, seed + 1)


# Each part of the zoo in at least one model: learned positions (GPT-2), rotary full and partial,
# interleaved (GPT-J) and not (NeoX, LLaMA), ALiBi, GQA and MQA, parallel blocks with one norm
# (GPT-J) and two (NeoX), RMSNorm + SwiGLU (LLaMA).
ARCHS = {
    "gpt2": lambda: randomize(gpt2(V, n_layers=2, n_heads=N_HEADS, d_model=D_MODEL,
                                   block_size=BLOCK_SIZE, key=jax.random.PRNGKey(0)), 1),
    "llama": lambda: compose(nn.Rotary(HEAD_DIM), n_kv_heads=2, llama=True),
    "gpt-j": lambda: compose(nn.Rotary(HEAD_DIM, fraction=0.5, interleaved=True),
                             parallel="gpt-j"),
    "neox": lambda: compose(nn.Rotary(HEAD_DIM, fraction=0.25), parallel="neox"),
    "alibi-mqa": lambda: compose(nn.ALiBi(N_HEADS), n_kv_heads=1),
}
LEARNED = ["gpt2"]
SLIDING = [name for name in ARCHS if name not in LEARNED]


# One layer: a cached key depends only on its own token (and relative position), so sliding the
# cache past block_size is the same as recomputing the last block_size tokens.
ONE_LAYER = {
    "rotary-1-layer": lambda: compose(nn.Rotary(HEAD_DIM), n_layers=1),
    "alibi-1-layer": lambda: compose(nn.ALiBi(N_HEADS), n_layers=1),
}


# An output head of its own (a Linear) rather than tied to the token embedding.
UNTIED = {"gpt2-untied-head": lambda: randomize(gpt2(
    V, n_layers=1, n_heads=N_HEADS, d_model=D_MODEL, block_size=BLOCK_SIZE, tie_head=False,
    key=jax.random.PRNGKey(0)), 4)}


@functools.cache
def build(name: str) -> GPT:
    return {**ARCHS, **ONE_LAYER, **UNTIED}[name]()


def generate(model, prompts, n=N_NEW, **kwargs) -> np.ndarray:
    return np.concatenate(list(generate_tokens(model, prompts, max_new_tokens=n, **kwargs)), 1)


PROMPT = np.array([3, 1, 4, 1, 5])
forward = eqx.filter_jit(lambda model, tokens: model(tokens))
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


def last_logits(model, context: list[int], width: int, forward=forward) -> np.ndarray:
    """The full forward's next-token logits after `context`, right-padded to `width` tokens so
    one compilation serves every length (causality hides the padding from earlier positions)."""
    padded = jnp.asarray(context + [0] * (width - len(context)), jnp.int32)
    return np.asarray(forward(model, padded)[len(context) - 1])


def greedy_cropped(model, prompt, n) -> np.ndarray:
    """Greedy decoding as nanoGPT does it: the model on the last block_size tokens, every step."""
    history = list(prompt)
    for _ in range(n):
        window = history[-model.block_size:]
        history.append(int(np.argmax(last_logits(model, window, model.block_size))))
    return np.array(history[len(prompt):])


def greedy_shifted(model, prompt, n, keep=0.5) -> np.ndarray:
    """Greedy decoding with llama.cpp's context shift, by full forwards: once the context holds
    more than block_size tokens, only its last `keep * block_size` remain, at positions 0.."""
    context, out = list(prompt[-model.block_size:]), []
    for _ in range(n):
        out.append(int(np.argmax(last_logits(model, context, model.block_size))))
        context.append(out[-1])
        if len(context) > model.block_size:
            context = context[-max(1, int(keep * model.block_size)):]
    return np.array(out)


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


# Batches and seeds


@pytest.mark.parametrize("name", ARCHS)
def test_a_batch_of_prompts_equals_generating_each_alone(name):
    model = build(name)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, V, n) for n in (3, 9, 14)]
    batch = generate(model, prompts, seeds=[5, 6, 7])
    for prompt, seed, row in zip(prompts, [5, 6, 7], batch, strict=True):
        np.testing.assert_array_equal(generate(model, [prompt], seeds=[seed])[0], row)


@pytest.mark.parametrize("name", [*ARCHS, *UNTIED])
def test_the_rowwise_layout_gives_the_models_logits_for_one_row_and_for_many(name):
    """`nn.rowwise_layout` stores each weight (out, in) and applies it to a single row as a
    multiply-reduce: a vmapped decode step (one token per example) takes that path, the full
    forward (many rows) a matrix product. Both equal the model's own."""
    model = build(name)
    rows = nn.rowwise_layout(model)
    assert not any(isinstance(x, nn.Linear) for x in
                   jax.tree.leaves(rows, is_leaf=lambda x: isinstance(x, nn.Linear)))
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, V, BLOCK_SIZE), jnp.int32)
    np.testing.assert_allclose(forward(rows, tokens), forward(model, tokens), rtol=1e-5, atol=1e-5)

    @eqx.filter_jit
    def step(model, tokens):  # each row's token at position 0 of a fresh cache
        def one(token):
            return model.decode(token[None], jnp.zeros(1, jnp.int32), model.init_cache())[0]
        return jax.vmap(one)(tokens)

    np.testing.assert_allclose(step(rows, tokens[:4]), step(model, tokens[:4]), rtol=1e-5,
                               atol=1e-5)


@pytest.fixture
def conversions(monkeypatch) -> list[tuple[bool, bool]]:
    """The `(unstack, rows_first)` flags of each model the sampler converts for decoding."""
    forms = []
    real = layout.decoding_form
    monkeypatch.setattr(layout, "_last_form", [])  # no form kept from an earlier test
    monkeypatch.setattr(layout, "decoding_form",
                        lambda m, *flags: forms.append(flags) or real(m, *flags))
    return forms


def test_batches_of_min_rows_or_more_decode_in_the_rowwise_layout_on_cpu(conversions):
    model = build("gpt2")  # scanned blocks: written out for decoding at any batch size
    generate(model, [PROMPT], n=3)
    generate(model, [PROMPT] * (MIN_ROWS - 1), n=3)  # padded to MIN_ROWS rows
    # One row keeps XLA:CPU's matrix product, the faster there.
    assert conversions == [(True, False), (True, True)]


def test_a_model_is_converted_for_decoding_once_while_it_lives(conversions):
    """Repeated calls on one model reuse its decoding form; another model's form replaces it
    (one is kept), and the kept form is released with its model, not with a replaced one."""
    model = ARCHS["gpt2"]()  # scanned blocks: converted for decoding; not build's cached one
    first = generate(model, [PROMPT], n=3)
    np.testing.assert_array_equal(generate(model, [PROMPT], n=3), first)
    assert len(conversions) == 1
    other = ARCHS["gpt2"]()
    np.testing.assert_array_equal(generate(other, [PROMPT], n=3), first)  # same weights
    assert len(conversions) == 2
    np.testing.assert_array_equal(generate(model, [PROMPT], n=3), first)
    assert len(conversions) == 3
    del other
    gc.collect()
    assert layout._last_form  # model's form, kept while model lives
    del model
    gc.collect()
    assert not layout._last_form


def test_a_model_without_weak_references_is_converted_at_every_call(conversions, monkeypatch):
    """A pytree that takes no weak references (a tuple-based one, say) is still sampled."""
    def no_weak_references(model, *args):
        raise TypeError(f"cannot create weak reference to {type(model).__name__!r} object")

    monkeypatch.setattr(layout, "weakref", types.SimpleNamespace(ref=no_weak_references))
    model = ARCHS["gpt2"]()
    first = generate(model, [PROMPT], n=3)
    np.testing.assert_array_equal(generate(model, [PROMPT], n=3), first)
    assert len(conversions) == 2 and not layout._last_form


@pytest.mark.parametrize("name", ARCHS)
def test_the_same_seed_gives_the_same_tokens_another_seed_others(name):
    model = build(name)
    first = generate(model, [PROMPT], seeds=[5])
    np.testing.assert_array_equal(generate(model, [PROMPT], seeds=[5]), first)
    assert (generate(model, [PROMPT], seeds=[8]) != first).mean() > 0.3


def test_a_prompt_longer_than_block_size_is_cropped_to_its_last_block_size_tokens():
    model = build("gpt2")
    long_prompt = np.random.default_rng(3).integers(0, V, BLOCK_SIZE + 7)
    np.testing.assert_array_equal(generate(model, [long_prompt], seeds=[5]),
                                  generate(model, [long_prompt[-BLOCK_SIZE:]], seeds=[5]))


def test_top_k_1_generates_the_greedy_tokens():
    model = build("alibi-mqa")
    np.testing.assert_array_equal(generate(model, [PROMPT], top_k=1, seeds=[5]),
                                  generate(model, [PROMPT], temperature=0))


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


def test_a_long_window_is_decoded_over_only_the_cache_slots_it_holds(monkeypatch):
    """With a 256-token window the first tokens are decoded over the cache's first 64 slots,
    then its first 128, then all of them, in a batch whose rows fill them at different tokens
    (one chunk ends at position 64 exactly): after every chunk the cache equals decoding over all
    its slots, and greedy tokens equal the full forward's, past the window too."""
    model = randomize(gpt2(V, n_layers=1, n_heads=2, d_model=16, block_size=256,
                           key=jax.random.PRNGKey(2)), seed=3)
    prompts = [PROMPT, np.random.default_rng(4).integers(0, V, 33)]
    chunk = decode_chunk

    def run(min_extent: int, **kwargs):
        monkeypatch.setattr(layout, "MIN_EXTENT", min_extent)
        extents, caches = [], []

        def recorded(*args):
            state, tokens = chunk(*args)
            extents.append(args[-1])
            caches.append(jax.tree.map(np.asarray, state.cache))  # before it is donated
            return state, tokens
        monkeypatch.setattr(loop, "decode_chunk", recorded)
        return generate(model, prompts, n=280, **kwargs), extents, caches

    tokens, extents, caches = run(64, seeds=[1, 2])
    whole_tokens, whole_extents, whole_caches = run(256, seeds=[1, 2])
    assert list(dict.fromkeys(extents)) == [64, 128, 256] and set(whole_extents) == {256}
    np.testing.assert_array_equal(tokens, whole_tokens)
    for cache, whole in zip(caches, whole_caches, strict=True):
        np.testing.assert_array_equal(cache[0].positions, whole[0].positions)
        np.testing.assert_allclose(cache[0].k, whole[0].k, atol=1e-6)
        np.testing.assert_allclose(cache[0].v, whole[0].v, atol=1e-6)
    greedy, _, _ = run(64, temperature=0)
    for row, prompt in zip(greedy, prompts, strict=True):
        np.testing.assert_array_equal(row, greedy_shifted(model, prompt, 280))


def test_caches_of_an_eighth_of_the_weights_or_more_are_read_by_extent():
    model = gpt2(5000, n_layers=1, n_heads=2, d_model=16, block_size=256,
                 key=jax.random.PRNGKey(0))  # 34 kB of cache per row, 350 kB of weights

    def rows(n: int):
        return jax.tree.map(lambda a: jnp.stack([a] * n), model.init_cache())
    assert [layout.reads_by_extent(model, rows(n)) for n in (1, 2)] == [False, True]
    assert not layout.reads_by_extent(model, None)  # no cache: recomputed


def test_extents_are_halves_of_the_window_down_to_min_extent():
    assert [layout.extent(1024, end) for end in (1, 64, 65, 256, 257, 1024, 1100)] == [
        64, 64, 128, 256, 512, 1024, 1024]
    assert [layout.extent(256, end) for end in (1, 64, 65, 129)] == [64, 64, 128, 256]
    assert layout.extent(96, 1) == 96  # a half would be below MIN_EXTENT


# Models that cannot cache fall back to recomputing the context


@pytest.mark.parametrize("name, model", [
    ("head-qk", lambda: compose(learned=True, head_qk=True)),
    ("sgu", lambda: compose(mlp=lambda k: nn.SGUMLP(D_MODEL, BLOCK_SIZE, hidden_mult=1, key=k))),
], ids=["head-qk", "sgu"])
def test_models_that_mix_positions_are_sampled_without_cache(name, model):
    model = model()
    assert not model.cacheable
    np.testing.assert_array_equal(generate(model, [PROMPT], temperature=0, context="crop")[0],
                                  greedy_cropped(model, PROMPT, N_NEW))
    np.testing.assert_array_equal(generate(model, [PROMPT], temperature=0)[0],
                                  greedy_shifted(model, PROMPT, N_NEW))


# Compilation


def test_prompt_lengths_in_one_bucket_share_the_compiled_programs():
    def compiled() -> np.ndarray:  # decode chunks, prefills, merges of shifted and decoded rows
        return np.array([f.n_compiled for f in (decode_chunk, prefill, merge_rows)])

    # A shape no other test compiles, so that the counts start here.
    model = gpt2(V, n_layers=1, n_heads=2, d_model=24, block_size=BLOCK_SIZE,
                 key=jax.random.PRNGKey(0))
    before = compiled()
    # Past the window, the prompt is padded to the length every shift re-encodes: one prefill
    # serves the prompt and the shifts.
    generate(model, [PROMPT[:3]], seeds=[0])
    np.testing.assert_array_equal(compiled() - before, [1, 1, 0])
    generate(model, [PROMPT], n=N_NEW + 9, seeds=[1])  # another prompt length and max_new_tokens
    np.testing.assert_array_equal(compiled() - before, [1, 1, 0])
    generate(model, [PROMPT[:3]], n=7, seeds=[0])  # inside the window: the prompt's own bucket
    np.testing.assert_array_equal(compiled() - before, [1, 2, 0])
    generate(model, [np.arange(10) % V], n=7, seeds=[1])
    generate(model, [PROMPT[:3]], n=5, seeds=[2])
    np.testing.assert_array_equal(compiled() - before, [1, 2, 0])
    generate(model, [PROMPT[:3], PROMPT[:3]], n=5)  # the counter does count: a new batch size
    np.testing.assert_array_equal(compiled() - before, [2, 3, 0])


# Edge cases


def test_max_new_tokens_0_generates_nothing():
    assert list(generate_tokens(build("gpt2"), [PROMPT], max_new_tokens=0)) == []


def test_an_empty_prompt_is_an_error():
    with pytest.raises(GptzooError, match="prompt is empty"):
        generate(build("gpt2"), [PROMPT, np.array([], np.int32)])


def test_a_character_split_across_chunks_is_streamed_whole():
    from gptzoo.data import ByteTokenizer
    from gptzoo.sample import TextStream

    tokenizer = ByteTokenizer()
    text = "héllo, 世界"
    data = list(text.encode("utf-8"))
    stream = TextStream(tokenizer)
    pieces = [stream.push(data[i:i + 2]) for i in range(0, len(data), 2)] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    cut_short = TextStream(tokenizer)
    assert cut_short.push(data[-3:-1]) == "" and cut_short.flush() == "\ufffd"  # 界 cut short
