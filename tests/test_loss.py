"""The training loss against a float64 NumPy reference: values, gradients, extreme logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptzoo.trainer.loss import cross_entropy


def reference(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row losses and the gradient of their sum, in float64."""
    x = logits.astype(np.float64)
    shifted = x - x.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    losses = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    grad = np.exp(log_probs) - np.eye(x.shape[-1])[labels]
    return losses, grad


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_losses_and_gradients_match_a_float64_reference(scale):
    rng = np.random.default_rng(0)
    logits = (scale * rng.standard_normal((3, 5, 317))).astype(np.float32)
    labels = jnp.asarray(rng.integers(0, 317, (3, 5)))
    total, grad = jax.value_and_grad(lambda x: cross_entropy(x, labels).sum())(logits)
    want_losses, want_grad = reference(logits, np.asarray(labels))
    losses = cross_entropy(jnp.asarray(logits), labels)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(total, want_losses.sum(), rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, atol=1e-5)


def test_the_gradient_is_scaled_by_each_rows_cotangent_and_keeps_the_logits_dtype():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((4, 50)), jnp.bfloat16)
    labels = jnp.arange(4)
    weights = jnp.array([0.0, 1.0, 2.0, -1.0])
    grad = jax.grad(lambda x: (cross_entropy(x, labels) * weights).sum())(logits)
    assert grad.dtype == jnp.bfloat16 and cross_entropy(logits, labels).dtype == jnp.float32
    _, want = reference(np.asarray(logits, np.float32), np.arange(4))
    np.testing.assert_allclose(np.asarray(grad, np.float32), want * weights[:, None],
                               atol=1e-2)


def test_huge_logits_give_finite_losses_and_gradients():
    logits = jnp.array([[1e4, 1e4 - 1.0, -1e4], [88.0, 89.0, 90.0], [-jnp.inf, 0.0, -jnp.inf]])
    labels = jnp.array([1, 0, 1])
    want = [1.0 + np.log1p(np.exp(-1.0)), 2.0 + np.log(1 + np.exp(-1.0) + np.exp(-2.0)), 0.0]
    np.testing.assert_allclose(cross_entropy(logits, labels), want, atol=1e-3)  # f32 ulp at 1e4
    grad = jax.grad(lambda x: cross_entropy(x, labels).sum())(logits)
    assert np.isfinite(np.asarray(grad)).all()


def test_the_backward_is_one_elementwise_pass_with_no_scatter():
    # Autodiff of an integer-label gather scatters into a zeroed array of the logits' size.
    logits, labels = jnp.zeros((4, 50)), jnp.arange(4)
    program = str(jax.make_jaxpr(jax.grad(lambda x: cross_entropy(x, labels).sum()))(logits))
    assert "scatter" not in program
