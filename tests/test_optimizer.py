"""The optimizer as the training step applies it: the learning rate each step uses (warmup, peak,
cosine end) against the formula written out, global-norm clipping, and dropout in a trained GPT."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import RECIPE, TINY_ONE_EVAL, loss_window_by_window

import gptzoo
from gptzoo.data import prepare_corpus
from gptzoo.recipe import OptimizerConfig
from gptzoo.trainer.optimizer import make_optimizer

LR, MIN_LR_RATIO, WARMUP, MAX_STEPS = 1e-2, 0.1, 10, 50


def hand_lr(step: int) -> float:
    """Linear from 0 to LR over WARMUP steps, then half a cosine down to LR * MIN_LR_RATIO."""
    end = LR * MIN_LR_RATIO
    if step < WARMUP:
        return LR * step / WARMUP
    progress = min(step - WARMUP, MAX_STEPS - WARMUP) / (MAX_STEPS - WARMUP)
    return end + (LR - end) * 0.5 * (1 + math.cos(math.pi * progress))


def test_each_step_moves_by_the_scheduled_learning_rate():
    """With a constant gradient Adam's step is lr * g / (|g| + eps), i.e. the learning rate itself
    for |g| = 1; a 1-D parameter takes no weight decay."""
    cfg = OptimizerConfig(lr=LR, min_lr_ratio=MIN_LR_RATIO, warmup_steps=WARMUP)
    optimizer = make_optimizer(cfg, MAX_STEPS)
    params = {"bias": jnp.zeros(1)}
    state = optimizer.init(params)
    steps = []
    for _ in range(MAX_STEPS + 1):
        updates, state = optimizer.update({"bias": jnp.ones(1)}, state, params)
        steps.append(-float(updates["bias"][0]))
    expected = [hand_lr(s) for s in range(MAX_STEPS + 1)]
    np.testing.assert_allclose(steps, expected, rtol=1e-5, atol=1e-9)
    assert steps[0] == 0.0 and steps[WARMUP // 2] == pytest.approx(LR / 2, rel=1e-5)
    assert steps[WARMUP] == pytest.approx(LR, rel=1e-5)  # the peak
    assert steps[(WARMUP + MAX_STEPS) // 2] == pytest.approx(LR * (1 + MIN_LR_RATIO) / 2, rel=1e-5)
    assert steps[MAX_STEPS] == pytest.approx(LR * MIN_LR_RATIO, rel=1e-5)  # the cosine's end


@pytest.mark.parametrize("scale", [10.0, 0.05])
def test_gradients_are_clipped_to_grad_clip_global_norm(scale):
    """Adam's first moment after one step is (1 - beta1) times the gradient it was given: the
    clipped one, whose global norm over every parameter is at most grad_clip."""
    cfg = OptimizerConfig(lr=LR, warmup_steps=0, grad_clip=0.5)
    optimizer = make_optimizer(cfg, MAX_STEPS)
    params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(4)}
    grads = {"w": scale * jnp.arange(6.0).reshape(2, 3), "b": scale * jnp.ones(4)}
    norm = math.sqrt(sum(float(jnp.sum(g**2)) for g in grads.values()))
    factor = min(1.0, cfg.grad_clip / norm)
    assert (factor < 1) == (scale > 1)  # one case is clipped, the other left alone
    _, state = optimizer.update(grads, optimizer.init(params), params)
    mu = optax.tree_utils.tree_get(state, "mu")
    for name in grads:
        np.testing.assert_allclose(mu[name], (1 - cfg.beta1) * factor * np.asarray(grads[name]),
                                   rtol=1e-6)


def test_dropout_changes_training_and_leaves_evaluation_deterministic(tmp_path, small_text):
    def run(dropout: str):
        recipe = gptzoo.load_recipe(RECIPE, {**TINY_ONE_EVAL, "trainer.max_steps": "10",
                                             "trainer.eval_interval": "10",
                                             "model.dropout": dropout,
                                             "data.path": str(small_text)})
        result = gptzoo.train(recipe, run_dir=tmp_path / dropout)
        losses = [json.loads(line)["train_loss"]
                  for line in (tmp_path / dropout / "metrics.jsonl").open()]
        return recipe, result, losses

    _, _, plain_losses = run("0.0")
    recipe, result, losses = run("0.3")
    model = result.model
    assert model.embed_dropout.p == 0.3
    # Same seed, same batches, same initial weights: only dropout tells the two runs apart.
    assert not np.allclose(losses, plain_losses, rtol=1e-3), (losses, plain_losses)
    val_split = prepare_corpus(recipe.data).val
    val = val_split[:len(val_split)]
    window = jnp.asarray(val[:32])
    np.testing.assert_array_equal(model(window), model(window))  # no key: no dropout
    assert not np.allclose(model(window, key=jax.random.PRNGKey(0)), model(window), atol=1e-4)
    first, second = (gptzoo.evaluate(model, val, 32).loss for _ in range(2))
    assert first == second
    expected, _ = loss_window_by_window(model, val, 32, 32)
    assert first == pytest.approx(expected, rel=1e-5)
    assert result.val_loss == pytest.approx(expected, rel=1e-5)
