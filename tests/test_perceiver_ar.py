"""Perceiver AR: causal cross-attention against NumPy float64; the model is causal at every
latent alignment (full, shorter and latent-only inputs); and, through the generic trainer,
evaluator and sampler, the real recipe trains, every validation token is scored once, and
sampling reads the row that predicts the next token."""

import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_ONE_EVAL, loss_window_by_window

import gptzoo
from gptzoo import nn
from gptzoo.data import all_windows, prepare_corpus
from gptzoo.models import PerceiverAR, perceiver_ar
from gptzoo.nn.stack import same_layout, unstacked
from gptzoo.sample import generate_tokens

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "perceiver_ar_shakespeare.py"
BLOCK, LATENTS, VOCAB = 24, 8, 11


def f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def randomize(module, key, scale=0.5):
    """Every array of `module` redrawn from N(0, scale^2), so norm weights, biases and the two
    separate norms take part."""
    params, static = eqx.partition(module, eqx.is_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    leaves = [scale * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves, strict=True)]
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)


def np_layernorm(x, norm, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return ((x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * f64(norm.weight)
            + f64(norm.bias))


def np_linear(x, linear):
    return x @ f64(linear.weight) + f64(linear.bias)


@eqx.filter_jit
def forward(model, tokens, key=None):
    return model(tokens, key=key)


@pytest.fixture(scope="module")
def model() -> PerceiverAR:
    """Weights drawn large, so any dependence on a token shows well above float32 noise."""
    model = perceiver_ar(VOCAB, n_layers=2, n_heads=2, d_model=16, block_size=BLOCK,
                         n_latents=LATENTS, tie_head=False, key=jax.random.PRNGKey(0))
    # Drawn per layer, then stacked again: the same weights whether its blocks are scanned or not.
    return same_layout(model, randomize(unstacked(model), jax.random.PRNGKey(1), scale=0.3))


# Cross-attention


@pytest.mark.parametrize("n_latents, seq", [(4, 10), (10, 10), (1, 7)])
def test_cross_attention_matches_numpy(n_latents, seq):
    d, heads = 16, 4
    xattn = randomize(nn.CausalCrossAttention(d, heads, key=jax.random.PRNGKey(0)),
                      jax.random.PRNGKey(1))
    context = jax.random.normal(jax.random.PRNGKey(2), (2, seq, d))
    latents = context[:, seq - n_latents:] + 0.1  # any latents: not the context's own rows
    got = eqx.filter_jit(xattn)(latents, context)

    q = np_linear(np_layernorm(f64(latents), xattn.query_norm), xattn.q)
    kv = np_linear(np_layernorm(f64(context), xattn.context_norm), xattn.kv)
    k, v = kv[..., :d], kv[..., d:]
    hd = d // heads
    expected = np.zeros((2, n_latents, d))
    for b in range(2):
        for i in range(n_latents):
            visible = seq - n_latents + i + 1  # latent i sits at position seq - n_latents + i
            for h in range(heads):
                cols = slice(h * hd, (h + 1) * hd)
                scores = k[b, :visible, cols] @ q[b, i, cols] / np.sqrt(hd)
                p = np.exp(scores - scores.max())
                expected[b, i, cols] = (p / p.sum()) @ v[b, :visible, cols]
    expected = np_linear(expected, xattn.out)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_cross_attention_rejects_more_latents_than_context_and_bad_heads():
    xattn = nn.CausalCrossAttention(16, 4, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="latents exceed the context"):
        xattn(jnp.zeros((5, 16)), jnp.zeros((4, 16)))
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        nn.CausalCrossAttention(16, 3, key=jax.random.PRNGKey(0))


# The model


@pytest.mark.parametrize("seq", [BLOCK, 13, LATENTS, 5])
def test_model_is_causal_at_every_latent_alignment(model, seq):
    """Changing the token at position t leaves the logits of every earlier position unchanged
    and changes the logits at t itself (when t is a latent)."""
    tokens = jax.random.randint(jax.random.PRNGKey(3), (seq,), 0, VOCAB)
    n = min(LATENTS, seq)
    positions = np.arange(seq - n, seq)  # each output row's absolute position
    base = np.asarray(forward(model, tokens))
    assert base.shape == (n, VOCAB)
    changed = jnp.stack([tokens.at[t].set((tokens[t] + 1) % VOCAB) for t in range(seq)])
    outs = np.asarray(forward(model, changed))  # one batch: row t changed its token t
    for t in range(seq):
        before = positions < t
        np.testing.assert_allclose(outs[t][before], base[before], rtol=1e-5, atol=1e-6)
        if t in positions:
            assert np.abs(outs[t][positions == t] - base[positions == t]).max() > 1e-2


def test_model_latents_read_the_context_before_them(model):
    """The first latent's logits depend on tokens before it: the cross-attention reaches back
    through the whole context, not just the latents."""
    tokens = jax.random.randint(jax.random.PRNGKey(4), (BLOCK,), 0, VOCAB)
    changed = tokens.at[0].set((tokens[0] + 1) % VOCAB)
    assert np.abs(forward(model, tokens)[0] - forward(model, changed)[0]).max() > 1e-2


def test_model_batches_dropout_and_bad_latents(model):
    tokens = jax.random.randint(jax.random.PRNGKey(5), (3, BLOCK), 0, VOCAB)
    np.testing.assert_allclose(forward(model, tokens)[1], forward(model, tokens[1]),
                               rtol=1e-5, atol=1e-6)
    dropped = perceiver_ar(VOCAB, n_layers=1, n_heads=2, d_model=16, block_size=BLOCK,
                           n_latents=LATENTS, dropout=0.5, key=jax.random.PRNGKey(0))
    assert not np.allclose(forward(dropped, tokens, jax.random.PRNGKey(1)),
                           forward(dropped, tokens))
    with pytest.raises(ValueError, match="n_latents=30 must lie in"):
        perceiver_ar(VOCAB, n_layers=1, n_heads=2, d_model=16, block_size=BLOCK, n_latents=30,
                     key=jax.random.PRNGKey(0))


# Through the generic trainer, evaluator and sampler


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_text):
    recipe = gptzoo.load_recipe(RECIPE, {**TINY_ONE_EVAL, "model.n_heads": "4",
                                         "model.n_latents": "8", "data.path": str(small_text)})
    run_dir = tmp_path_factory.mktemp("perceiver_ar")
    return recipe, gptzoo.train(recipe, run_dir=run_dir), run_dir


def test_recipe_trains_through_the_generic_trainer(trained):
    recipe, result, run_dir = trained
    assert isinstance(result.model, PerceiverAR) and result.model.n_latents == 8
    losses = [json.loads(line)["train_loss"] for line in (run_dir / "metrics.jsonl").open()]
    assert losses[-1] < losses[0] - 0.3
    assert np.isfinite(result.val_loss)


@pytest.mark.parametrize("n, block_size, stride", [(50, 8, 8), (50, 8, 3), (7, 8, 2), (9, 4, 1)])
def test_all_windows_score_each_token_once_with_its_true_context(n, block_size, stride):
    tokens = np.arange(1, n + 1)  # nonzero, so the left padding (token 0) stands out
    inputs, targets, mask = all_windows(tokens, block_size, stride)
    assert sorted(targets[mask]) == list(tokens[1:])
    for w, j in zip(*np.nonzero(mask), strict=True):
        t = targets[w, j] - 1  # index of the scored token
        context = [tokens[i] if i >= 0 else 0 for i in range(t - j - 1, t)]
        assert list(inputs[w, : j + 1]) == context
        assert j >= block_size - stride  # only a window's last `stride` positions are scored


def test_evaluate_scores_every_validation_token_once(trained):
    recipe, result, _ = trained
    val_split = prepare_corpus(recipe.data).val
    val = val_split[:len(val_split)]
    evaluated = gptzoo.evaluate(result.model, val, recipe.model.block_size)
    assert evaluated.n_tokens == len(val) - 1
    loss, count = loss_window_by_window(result.model, val, recipe.model.block_size,
                                        recipe.model.n_latents)
    assert count == len(val) - 1
    assert evaluated.loss == pytest.approx(loss, rel=1e-5)
    assert result.val_loss == pytest.approx(loss, rel=1e-5)  # training's final evaluation


def test_greedy_sampling_reads_the_last_latent_of_a_full_window(trained):
    recipe, result, _ = trained
    model, tokenizer, block_size = result.model, result.tokenizer, recipe.model.block_size
    prompt = Path(recipe.data.path).read_text()[:40]  # longer than block_size: every window is full
    text = gptzoo.generate(model, tokenizer, prompt, max_new_tokens=20, temperature=0,
                           context="crop")
    assert text == gptzoo.generate(model, tokenizer, prompt, max_new_tokens=20, temperature=0,
                                   context="crop")
    history = list(tokenizer.encode(prompt))
    for _ in range(20):  # the last row predicts the token after the window (nanoGPT's crop)
        window = jnp.asarray(history[-block_size:])
        history.append(int(jnp.argmax(forward(model, window)[-1])))
    assert text == tokenizer.decode(history)


@pytest.mark.parametrize("prompt_length", [3, 18], ids=["before-latents", "in-latents"])
def test_greedy_sampling_reads_the_row_of_the_last_token(model, prompt_length):
    """The random model, whose rows differ well above noise: each new token comes from the row of
    the history's last token in one window of BLOCK tokens, the history left-padded with token 0
    up to the first latent when it is shorter than that, right-padded otherwise."""
    history = list(np.random.default_rng(4).integers(0, VOCAB, prompt_length))
    chunks = generate_tokens(model, [np.asarray(history)], max_new_tokens=5, temperature=0)
    sampled = np.concatenate(list(chunks), axis=1)[0].tolist()
    for _ in range(5):
        last, first_latent = len(history) - 1, BLOCK - LATENTS
        if last < first_latent:
            window, row = [0] * (first_latent - last) + history + [0] * (LATENTS - 1), 0
        else:
            window, row = history + [0] * (BLOCK - len(history)), last - first_latent
        history.append(int(jnp.argmax(forward(model, jnp.asarray(window))[row])))
    assert sampled == history[prompt_length:]


def test_sampling_a_short_prompt_reads_the_first_latent(trained):
    """A history shorter than the context before the latents is left-padded with token 0 so that
    its last token sits at the first latent, whose row predicts the next token."""
    recipe, result, _ = trained
    model, tokenizer = result.model, result.tokenizer
    block_size, n_latents = recipe.model.block_size, recipe.model.n_latents
    prompt, n_new = "ROMEO:", 4
    text = gptzoo.generate(model, tokenizer, prompt, max_new_tokens=n_new, temperature=0)
    history = list(tokenizer.encode(prompt))
    for _ in range(n_new):
        pad = block_size - n_latents + 1 - len(history)
        assert pad > 0  # the prompt stays short of the latents
        window = [0] * pad + history + [0] * (n_latents - 1)
        history.append(int(jnp.argmax(forward(model, jnp.asarray(window))[0])))
    assert text == tokenizer.decode(history)
    sampled = gptzoo.generate(model, tokenizer, [prompt, "JULIET:"], max_new_tokens=30, seed=1)
    assert sampled == gptzoo.generate(model, tokenizer, [prompt, "JULIET:"], max_new_tokens=30,
                                      seed=1)
    assert [len(s) for s in sampled] == [len(prompt) + 30, len("JULIET:") + 30]
