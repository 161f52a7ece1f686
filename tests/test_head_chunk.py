"""`trainer.head_chunk`: the head fused with the cross-entropy a chunk of positions at a time,
against a float64 NumPy reference and against the unfused loss in training; its memory; and the
models it cannot apply to."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, TINY

import gptzoo
import gptzoo.trainer.step as step_module
from gptzoo.errors import GptzooError
from gptzoo.trainer.loss import head_cross_entropy
from gptzoo.trainer.prepared import prepare

RECIPES = ROOT / "recipes"


def reference(hidden, weight, labels, cotangent):
    """Losses, and the gradients of `sum(losses * cotangent)` for hidden and weight, float64."""
    h, w = hidden.astype(np.float64), weight.astype(np.float64)
    logits = h @ w.T
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    losses = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    logits_grad = (np.exp(log_probs) - np.eye(w.shape[0])[labels]) * cotangent[..., None]
    return losses, logits_grad @ w, np.einsum("bsv,bsd->vd", logits_grad, h)


def inputs(dtype=jnp.float32, batch=2, seq=13, d=16, vocab=317):
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((batch, seq, d)).astype(np.float32)
    weight = (0.5 * rng.standard_normal((vocab, d))).astype(np.float32)
    labels = rng.integers(0, vocab, (batch, seq))
    cotangent = rng.uniform(-1, 2, (batch, seq)).astype(np.float32)
    return (jnp.asarray(hidden, dtype), jnp.asarray(weight, dtype), jnp.asarray(labels),
            jnp.asarray(cotangent))


@pytest.mark.parametrize("chunk", [1, 4, 13, 32])  # 4 pads 13 positions to 16; 32 is past them
def test_losses_and_gradients_match_a_float64_reference(chunk):
    hidden, weight, labels, cotangent = inputs()

    def weighted(h, w):
        return (head_cross_entropy(h, w, labels, chunk) * cotangent).sum()

    hidden_grad, weight_grad = jax.grad(weighted, argnums=(0, 1))(hidden, weight)
    want_losses, want_hidden_grad, want_weight_grad = reference(
        *(np.asarray(a) for a in (hidden, weight, labels, cotangent)))
    np.testing.assert_allclose(head_cross_entropy(hidden, weight, labels, chunk), want_losses,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hidden_grad, want_hidden_grad, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(weight_grad, want_weight_grad, rtol=1e-4, atol=1e-5)


def test_bfloat16_inputs_give_float32_losses_and_gradients_in_their_dtype():
    hidden, weight, labels, cotangent = inputs(jnp.bfloat16)
    losses = head_cross_entropy(hidden, weight, labels, 4)
    grads = jax.grad(lambda h, w: (head_cross_entropy(h, w, labels, 4) * cotangent).sum(),
                     argnums=(0, 1))(hidden, weight)
    assert losses.dtype == jnp.float32 and [g.dtype for g in grads] == [jnp.bfloat16] * 2
    want = reference(*(np.asarray(a, np.float32) for a in (hidden, weight)),
                     np.asarray(labels), np.asarray(cotangent))
    np.testing.assert_allclose(losses, want[0], rtol=2e-2, atol=2e-2)
    for got, expected in zip(grads, want[1:], strict=True):
        scale = np.abs(expected).max()
        np.testing.assert_allclose(np.asarray(got, np.float32) / scale, expected / scale,
                                   atol=2e-2)


def temporary_bytes(chunk: int) -> int:
    """Scratch memory of the compiled loss-and-gradients of a (4, 512) batch, vocabulary 8,192
    (its float32 logits: 64 MiB)."""
    hidden, weight, labels, _ = inputs(batch=4, seq=512, d=32, vocab=8192)

    def loss(h, w):
        if chunk:
            return head_cross_entropy(h, w, labels, chunk).mean()
        return gptzoo.trainer.loss.cross_entropy(jnp.einsum("bsd,vd->bsv", h, w), labels).mean()

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(hidden, weight).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_only_a_chunks_logits_are_ever_in_memory():
    logits_bytes = 4 * 512 * 8192 * 4
    unfused, chunked = temporary_bytes(0), temporary_bytes(64)
    assert unfused >= logits_bytes  # the whole batch's logits, at least once
    assert chunked < logits_bytes / 4  # a chunk's are an eighth of them


def train_losses(head_chunk: int, recipe: str = "char_shakespeare.py") -> np.ndarray:
    recipe = gptzoo.load_recipe(RECIPES / recipe, {**TINY, "trainer.head_chunk": str(head_chunk),
                                                   "trainer.steps_per_call": "3"})
    p = prepare(recipe, log=lambda *_: None)
    batches = p.train_batches.chunk(0, 3)
    _, _, stats = p.train_chunk((batches, p.train_key, np.int32(0)), p.model, p.opt_state)
    return np.asarray(stats.loss)


@pytest.mark.parametrize("recipe", ["char_shakespeare.py", "llama_shakespeare.py"])
def test_training_with_a_chunked_head_takes_the_unfused_steps(recipe, monkeypatch):
    chunks = []
    monkeypatch.setattr(step_module, "head_cross_entropy",
                        lambda *args: chunks.append(args[-1]) or head_cross_entropy(*args))
    # Three optimizer steps: the gradients of the first two steer the losses of the next.
    np.testing.assert_allclose(train_losses(8, recipe), train_losses(0, recipe), rtol=2e-5)
    assert chunks == [8]  # traced once, by the chunked run


@pytest.mark.parametrize("recipe, overrides, fragment", [
    ("perceiver_ar_shakespeare.py", {"model.n_latents": "16"}, r"lacks hidden_states\(\)"),
    ("alibi_shakespeare.py", {"model.head_qk": "true"}, "head-QK"),
    ("mixtral_shakespeare.py", {}, "auxiliary loss"),
])
def test_a_model_it_cannot_apply_to_is_one_line(recipe, overrides, fragment):
    recipe = gptzoo.load_recipe(RECIPES / recipe, {**TINY, "trainer.head_chunk": "8",
                                                   **overrides})
    with pytest.raises(GptzooError, match=fragment) as caught:
        prepare(recipe, log=lambda *_: None)
    assert "trainer.head_chunk" in str(caught.value) and "\n" not in str(caught.value)


def test_a_negative_chunk_is_refused_naming_the_key():
    with pytest.raises(GptzooError, match="trainer.head_chunk"):
        gptzoo.load_recipe(RECIPES / "char_shakespeare.py", {"trainer.head_chunk": "-1"})
