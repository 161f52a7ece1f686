"""The NaN/Inf guard: a non-finite step is skipped without touching the parameters, counted in the
metrics, no checkpoint is saved while they last, and too many in a row stop the run, keeping the
newest checkpoint that evaluates as well as the run did and setting newer ones aside."""

import json

import equinox as eqx
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
from gptzoo.trainer.divergence import REFERENCE_KEY, SET_ASIDE, LastGoodEvaluation, fall_back
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
    for a, b in zip(jax.tree.leaves((params, new_state)), jax.tree.leaves((PARAMS, state)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_finite_step_is_the_plain_update_and_reports_the_gradient_norm():
    state = warm_state()
    grads = {"w": jnp.array([[3.0, 0.0], [0.0, 0.0]]), "b": jnp.array([0.0, 4.0])}
    params, new_state, grad_norm, finite = guarded_update(OPTIMIZER, jnp.float32(2.0), grads,
                                                          PARAMS, state)
    updates, expected_state = OPTIMIZER.update(grads, state, PARAMS)
    expected = optax.apply_updates(PARAMS, updates)
    assert bool(finite) and float(grad_norm) == pytest.approx(5.0)  # before clipping to 1
    for a, b in zip(jax.tree.leaves((params, new_state)),
                    jax.tree.leaves((expected, expected_state)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_diverging_run_skips_its_bad_steps_then_stops(tmp_path, small_text):
    """A learning rate of 1e30 makes the first update finite, every weight ~1e30, and every later
    loss overflow. Step 1 is saved (the guard sees a finite step), steps 2 to 9 are not (skipped),
    and the run's stop sets step 1 aside: its parameters evaluate to nothing useful."""
    overrides = {**TINY, "data.path": str(small_text), "optimizer.lr": "1e30",
                 "optimizer.warmup_steps": "0", "trainer.max_bad_steps": "8",
                 "trainer.checkpoint_interval": "1"}
    with pytest.raises(GptzooError) as error:
        gptzoo.train(gptzoo.load_recipe(RECIPE, overrides), run_dir=tmp_path / "diverged")
    message = str(error.value)
    assert "8 steps in a row up to step 9" in message and "lower optimizer.lr" in message
    assert "no checkpoint evaluates as well as the run did" in message
    assert "step 1 (validation loss nan against a uniform guess's" in message
    assert "start again (without --resume)" in message
    records = [json.loads(ln) for ln in (tmp_path / "diverged" / "metrics.jsonl").open()]
    assert [(r["step"], r["bad_steps"]) for r in records] == [(5, 4), (10, 5)]
    assert not np.isfinite(records[0]["train_loss"])
    assert Checkpoints(tmp_path / "diverged").manager.all_steps() == []
    set_aside = tmp_path / "diverged" / "set_aside"
    assert sorted(p.name for p in set_aside.iterdir()) == ["1"]  # none saved while skipping
    # Step 1 as set aside holds the parameters of a one-step run: the bad steps changed nothing.
    gptzoo.train(gptzoo.load_recipe(RECIPE, {**overrides, "trainer.max_steps": "1"}),
                 run_dir=tmp_path / "one_step")
    after_one, _ = gptzoo.load(tmp_path / "one_step")
    (tmp_path / "aside_as_run" / "checkpoints").mkdir(parents=True)
    (set_aside / "1").rename(tmp_path / "aside_as_run" / "checkpoints" / "1")
    poisoned = Checkpoints(tmp_path / "aside_as_run").restore(1, after_one)
    for a, b in zip(jax.tree.leaves(poisoned), jax.tree.leaves(after_one), strict=True):
        np.testing.assert_array_equal(a, b)
        assert np.isfinite(a).all()
    assert max(np.abs(a).max() for a in jax.tree.leaves(after_one)) > 1e28


def test_a_run_that_ends_among_skipped_steps_fails_as_a_diverged_one(tmp_path, small_text):
    """Fewer bad steps than trainer.max_bad_steps, but the last: it ended with no checkpoint of
    its last step and a nan final loss, and reported itself finished."""
    overrides = {**TINY, "data.path": str(small_text), "optimizer.lr": "1e30",
                 "optimizer.warmup_steps": "0", "trainer.max_bad_steps": "100",
                 "trainer.max_steps": "10"}
    with pytest.raises(GptzooError, match=r"its last 9 step\(s\), up to step 10, had a "
                                          r"non-finite loss"):
        gptzoo.train(gptzoo.load_recipe(RECIPE, overrides), run_dir=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "failed"


def test_a_resumed_run_that_diverges_falls_back_to_its_last_good_checkpoint(tmp_path,
                                                                            small_text):
    """The issue's case: 40 good steps, then `--resume` with lr 1e30. Step 41 is finite and
    saved, holding weights of ~1e30; 42 on are skipped and not saved. The stop evaluates step
    41 (NaN), sets it aside, keeps step 40 (the loss its evaluation measured), and a resume with
    a sane learning rate starts there and trains to a finite loss."""
    run_dir = tmp_path / "run"
    good = {**TINY, "data.path": str(small_text), "trainer.max_steps": "40"}
    gptzoo.train(gptzoo.load_recipe(RECIPE, good), run_dir=run_dir)
    val_40 = [r["val_loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").open())
              if r["step"] == 40][0]
    diverging = {**good, "trainer.max_steps": "60", "optimizer.lr": "1e30",
                 "trainer.checkpoint_interval": "1", "trainer.max_bad_steps": "4"}
    with pytest.raises(GptzooError) as error:
        gptzoo.train(gptzoo.load_recipe(RECIPE, diverging), run_dir=run_dir, resume=True)
    message = str(error.value)
    assert f"checkpoint step 40 is kept (validation loss {val_40:.4f} against {val_40:.4f} at " \
           "the step 40 evaluation, on its batches)" in message
    assert f"set aside in {run_dir / 'set_aside'}: step 41 (validation loss nan" in message
    assert "--resume it with a lower optimizer.lr" in message
    assert Checkpoints(run_dir).manager.all_steps() == [30, 40]
    assert [p.name for p in (run_dir / "set_aside").iterdir()] == ["41"]
    result = gptzoo.train(gptzoo.load_recipe(RECIPE, {**good, "trainer.max_steps": "50"}),
                          run_dir=run_dir, resume=True)
    assert result.step == 50 and np.isfinite(result.val_loss) and result.val_loss < val_40
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").open()]
    assert [r["step"] for r in records][-3:] == [40, 45, 50]  # resumed from step 40


def test_a_finite_but_blown_up_checkpoint_is_set_aside(tmp_path):
    """A checkpoint whose loss is finite but far above its reference evaluation's is set aside;
    one within `TOLERANCE` of its own reference is kept, even below a newer reference."""
    checkpoints = Checkpoints(tmp_path)
    model = eqx.nn.Linear(2, 2, key=jax.random.PRNGKey(0))
    scales = {10: 1.0, 20: 2.0, 30: 1e30}  # the fake "loss" of each step's parameters
    references = {10: [10, 1.0], 20: [20, 1.9], 30: [20, 1.9]}
    for step, scale in scales.items():
        weights = eqx.tree_at(lambda m: m.weight, model, jnp.full((2, 2), scale))
        checkpoints.save(step, weights, {"m": jnp.zeros(2)}, {REFERENCE_KEY: references[step]})
    evaluated = []

    def val_loss(restored, batches_of_step):
        evaluated.append(batches_of_step)
        return float(restored.weight[0, 0])

    result = fall_back(checkpoints, model, val_loss, vocab_size=65)
    assert result.kept == 20 and [s for s, _ in result.set_aside] == [30]
    assert evaluated == [20, 20]  # each on its reference evaluation's batches
    assert checkpoints.manager.all_steps() == [10, 20]
    assert (tmp_path / SET_ASIDE / "30").is_dir()
    # Again, with the newest good checkpoint blown up too: 20 (2.0 > 1.9 x 1.1) goes as well.
    checkpoints.save(30, model, {"m": jnp.zeros(2)}, {REFERENCE_KEY: [20, 1.5]})
    checkpoints.manager.delete(20)
    result = fall_back(checkpoints, model, lambda m, s: 1e9, vocab_size=65)
    assert result.kept is None and (tmp_path / SET_ASIDE / "30-2").is_dir()
    checkpoints.close()


def test_the_last_good_evaluation_ignores_blow_ups():
    last_good = LastGoodEvaluation(vocab_size=65)
    last_good.offer(10, 4.5)  # within ln(65) x 1.1 = 4.59, the bound before any evaluation
    last_good.offer(20, float("nan"))
    last_good.offer(30, 1e9)
    assert last_good.saved() == [10, 4.5]
    last_good.offer(40, 4.9)  # 4.5 x 1.1 = 4.95: a noisy rise still counts
    assert last_good.saved() == [40, 4.9]
    assert LastGoodEvaluation(65, [40, 4.9]).bound() == pytest.approx(4.9 * 1.1)
    fresh = LastGoodEvaluation(65)
    fresh.offer(5, 5.0)  # an untrained model's loss lies near ln(65) = 4.17; 5.0 is above 4.59
    assert fresh.saved() is None


def test_records_carry_the_gradient_norm_and_no_bad_steps(trained_run):
    records = [json.loads(ln) for ln in (trained_run / "metrics.jsonl").open()]
    assert all(r["bad_steps"] == 0 and np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
               for r in records)
