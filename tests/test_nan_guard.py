"""The NaN/Inf guard: a non-finite step is skipped without touching the parameters, counted in the
metrics, and too many in a row stop the run with the last good checkpoint kept."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import RECIPE, TINY

import gptzoo
from gptzoo.errors import GptzooError
from gptzoo.recipe import OptimizerConfig
from gptzoo.trainer.checkpoint import Checkpoints
from gptzoo.trainer.optimizer import make_optimizer
from gptzoo.trainer.step import guarded_update

PARAMS = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.1, -0.1])}
OPTIMIZER = make_optimizer(OptimizerConfig(lr=0.1, warmup_steps=0), 10)


def warm_state():
    """An optimizer state after one real step, so a skipped update has moments to disturb."""
    state = OPTIMIZER.init(PARAMS)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    _, state = OPTIMIZER.update(grads, state, PARAMS)
    return state


@pytest.mark.parametrize("bad", ["nan_grad", "inf_grad", "inf_loss"])
def test_a_non_finite_step_changes_nothing(bad):
    state = warm_state()
    grads = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    loss = jnp.float32(1.0)
    if bad == "nan_grad":
        grads["w"] = grads["w"].at[0, 1].set(jnp.nan)
    elif bad == "inf_grad":
        grads["b"] = grads["b"].at[1].set(jnp.inf)
    else:
        loss = jnp.float32(jnp.inf)
    params, new_state, _, finite = guarded_update(OPTIMIZER, loss, grads, PARAMS, state)
    assert not bool(finite)
    for a, b in zip(jax.tree.leaves((params, new_state)), jax.tree.leaves((PARAMS, state))):
        np.testing.assert_array_equal(a, b)


def test_a_finite_step_is_the_plain_update_and_reports_the_gradient_norm():
    state = warm_state()
    grads = {"w": jnp.array([[3.0, 0.0], [0.0, 0.0]]), "b": jnp.array([0.0, 4.0])}
    params, new_state, grad_norm, finite = guarded_update(OPTIMIZER, jnp.float32(2.0), grads,
                                                          PARAMS, state)
    updates, expected_state = OPTIMIZER.update(grads, state, PARAMS)
    expected = optax.apply_updates(PARAMS, updates)
    assert bool(finite) and float(grad_norm) == pytest.approx(5.0)  # before clipping to 1
    for a, b in zip(jax.tree.leaves((params, new_state)), jax.tree.leaves((expected,
                                                                             expected_state))):
        np.testing.assert_array_equal(a, b)


def test_a_diverging_run_skips_its_bad_steps_then_stops(tmp_path, small_text):
    """A learning rate of 1e30 makes the first update finite but every later loss overflow."""
    overrides = {**TINY, "data.path": str(small_text), "optimizer.lr": "1e30",
                 "optimizer.warmup_steps": "0", "trainer.max_bad_steps": "8",
                 "trainer.checkpoint_interval": "5"}
    with pytest.raises(GptzooError) as error:
        gptzoo.train(gptzoo.load_recipe(RECIPE, overrides), run_dir=tmp_path / "diverged")
    message = str(error.value)
    assert "8 steps in a row up to step 9" in message and "lower optimizer.lr" in message
    records = [json.loads(ln) for ln in (tmp_path / "diverged" / "metrics.jsonl").open()]
    assert [(r["step"], r["bad_steps"]) for r in records] == [(5, 4), (10, 5)]
    assert not np.isfinite(records[0]["train_loss"])
    # The checkpoint at step 5 holds the parameters of step 1: the four bad steps changed nothing.
    assert Checkpoints(tmp_path / "diverged").manager.all_steps() == [5]
    gptzoo.train(gptzoo.load_recipe(RECIPE, {**overrides, "trainer.max_steps": "1"}),
                 run_dir=tmp_path / "one_step")
    after_bad, _ = gptzoo.load(tmp_path / "diverged")
    after_one, _ = gptzoo.load(tmp_path / "one_step")
    for a, b in zip(jax.tree.leaves(after_bad), jax.tree.leaves(after_one)):
        np.testing.assert_array_equal(a, b)
        assert np.isfinite(a).all()


def test_records_carry_the_gradient_norm_and_no_bad_steps(trained_run):
    records = [json.loads(ln) for ln in (trained_run / "metrics.jsonl").open()]
    assert all(r["bad_steps"] == 0 and np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
               for r in records)
