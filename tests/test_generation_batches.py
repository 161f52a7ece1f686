"""KV-cached generation in batches: a batch of prompts against each prompt alone, the row-wise
layout's logits against the model's, when and how often the sampler converts a model for
decoding, seeds, prompts cropped to block_size, and top_k=1 against greedy decoding."""

import gc
import types

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from generation_models import (
    ARCHS,
    BLOCK_SIZE,
    PROMPT,
    UNTIED,
    V,
    build,
    forward,
    generate,
    randomize,
)

from gptzoo import nn
from gptzoo.nn.rowwise import MIN_ROWS
from gptzoo.sample import layout

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


def test_a_batch_of_more_than_128_rows_samples_each_row_as_alone(conversions):
    """256 rows of one prompt, seed i for row i, sampled through the KV cache: every row draws
    what the full forward (no cache) draws with its seed. XLA:CPU computes the rowwise layout
    wrongly from row 128 of such a batch (gptzoo.workarounds.rowwise_batch_computes_right), and
    rows 128 to 255 took other rows' logits when that layout was used here."""
    from gptzoo.models import gpt2

    model = randomize(gpt2(256, n_layers=1, n_heads=2, d_model=32, block_size=16,
                           key=jax.random.PRNGKey(0)), seed=3)
    prompts, seeds = [np.array([1, 2, 3], np.int32)] * 256, list(range(256))
    cached = generate(model, prompts, seeds=seeds, n=6, temperature=1.0)
    full = generate(model, prompts, seeds=seeds, n=6, temperature=1.0, use_cache=False)
    np.testing.assert_array_equal(cached, full)
    assert not conversions[-1][1]  # the matrix product, not the rowwise layout


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
