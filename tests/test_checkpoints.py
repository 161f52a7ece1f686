"""Checkpoints: arrays keyed by name, mismatches named, rotation, fallback past a corrupt newest
step, resume refusals, Ctrl-C cases, an unwritable run directory and a full disk."""

import json
import os
import shutil
import signal
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import RECIPE, ROOT, TINY, SigintAt, gptzoo_cli, set_args

import gptzoo
from gptzoo.errors import GptzooError
from gptzoo.trainer import loop
from gptzoo.trainer.checkpoint import BestCheckpoint, Checkpoints, named_arrays
from gptzoo.trainer.prepared import Prepared


class Pair(eqx.Module):
    first: jax.Array
    second: jax.Array


class SwappedPair(eqx.Module):  # the same fields declared in the other order: a refactor
    second: jax.Array
    first: jax.Array


def corrupt(step_dir):
    for path in (step_dir / "model").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\0garbage")


def copy_run(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    return run_dir


def tiny_recipe(small_text, **overrides):
    return gptzoo.load_recipe(RECIPE, {**TINY, "data.path": str(small_text), **overrides})


def test_arrays_are_restored_by_name_not_by_position(tmp_path):
    saved = Pair(jnp.arange(4.0), jnp.arange(4.0) + 10)
    checkpoints = Checkpoints(tmp_path)
    checkpoints.save(1, saved, {"count": jnp.zeros(())}, {})
    template = SwappedPair(jnp.zeros(4), jnp.zeros(4))
    restored = checkpoints.restore(1, template)
    np.testing.assert_array_equal(restored.first, saved.first)
    np.testing.assert_array_equal(restored.second, saved.second)


def test_module_paths_name_the_arrays():
    scanned = {**TINY, "model.scan_layers": "true"}
    model = gptzoo.load_recipe(RECIPE, scanned).build(65, key=jax.random.PRNGKey(0))
    names = named_arrays(model)
    # Scanned, identical blocks are one Stack: each parameter has a leading layer axis.
    assert names["blocks.layers.attention.qkv.weight"].shape == (1, 32, 96)
    assert "token_embedding.weight" in names


def test_a_checkpoint_that_does_not_fit_names_the_differences(tmp_path):
    checkpoints = Checkpoints(tmp_path)
    checkpoints.save(1, Pair(jnp.zeros((2, 3)), jnp.zeros(4)), {"count": jnp.zeros(())}, {})
    wider = Pair(jnp.zeros((2, 5)), jnp.zeros(4))
    assert checkpoints.differences(1, wider) == [
        "checkpoint has first (2, 3); the recipe builds (2, 5)"]
    with pytest.raises(GptzooError, match=r"does not fit the recipe: checkpoint has first \(2, 3\)"
                                          r"; the recipe builds \(2, 5\)") as error:
        checkpoints.restore(1, wider)
    assert "corrupt" not in str(error.value)
    assert checkpoints.differences(1, SwappedPair(jnp.zeros(4), jnp.zeros((2, 3)))) == []
    assert checkpoints.differences(1, {"other": jnp.zeros(4)}) == [
        "checkpoint has first (2, 3); the recipe builds no such parameter",
        "the recipe builds other (4,), checkpoint lacks it",
        "checkpoint has second (4,); the recipe builds no such parameter"]


def test_rotation_keeps_the_newest_and_a_saved_step_is_not_rewritten(tmp_path):
    checkpoints = Checkpoints(tmp_path, keep=2)
    state = {"count": jnp.zeros(())}
    for step in (1, 2, 3):
        checkpoints.save(step, Pair(jnp.full(2, step), jnp.zeros(2)), state, {})
    assert checkpoints.manager.all_steps() == [2, 3]
    checkpoints.save(3, Pair(jnp.full(2, 99), jnp.zeros(2)), state, {})
    np.testing.assert_array_equal(checkpoints.restore(3, Pair(jnp.zeros(2), jnp.zeros(2))).first,
                                  [3, 3])


def test_load_falls_back_from_a_corrupt_newest_checkpoint(tmp_path, trained_run):
    run_dir = copy_run(trained_run, tmp_path)
    corrupt(run_dir / "checkpoints" / "30")
    result = gptzoo_cli("sample", "--ckpt", run_dir, "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert f"{run_dir / 'checkpoints' / '30'} is unreadable or corrupt" in result.stderr
    assert "fell back to step 20" in result.stderr
    model, _ = gptzoo.load(run_dir)
    expected = Checkpoints(trained_run).restore(20, model)
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


def test_resume_falls_back_and_saves_the_corrupt_step_again(tmp_path, trained_run, small_text,
                                                            capsys):
    run_dir = copy_run(trained_run, tmp_path)
    corrupt(run_dir / "checkpoints" / "30")
    result = gptzoo.train(tiny_recipe(small_text), run_dir=run_dir, resume=True)
    assert "fell back to step 20" in capsys.readouterr().err
    assert result.step == 30 and not result.interrupted
    model, _ = gptzoo.load(run_dir)  # step 30 again, rewritten and readable
    reference, _ = gptzoo.load(trained_run)
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(a, b)


def test_every_checkpoint_unreadable_is_an_error(tmp_path, trained_run):
    run_dir = copy_run(trained_run, tmp_path)
    for step_dir in (run_dir / "checkpoints").iterdir():
        corrupt(step_dir)
    with pytest.raises(GptzooError, match="unreadable or corrupt"):
        gptzoo.load(run_dir)


def test_resume_refuses_another_vocabulary(tmp_path, trained_run):
    other = tmp_path / "other.txt"
    other.write_text("abc " * 5_000)
    run_dir = copy_run(trained_run, tmp_path)
    with pytest.raises(GptzooError, match="tokenizer of this data .* differs"):
        gptzoo.train(tiny_recipe(other), run_dir=run_dir, resume=True)


def test_resume_names_the_parameters_a_changed_recipe_builds(tmp_path, trained_run, small_text):
    recipe_file = tmp_path / "deeper.py"  # the same ModelConfig, but one more block is built
    recipe_file.write_text(RECIPE.read_text().replace(
        'architecture = "gpt2"',
        "from gptzoo.models import build_architecture\n\n\n"
        "def build_model(model, vocab_size, *, key):\n"
        "    deeper = GPT2Config(**{**vars(model), 'n_layers': 2})\n"
        "    return build_architecture('gpt2', deeper, vocab_size, key=key)\n"))
    recipe = gptzoo.load_recipe(recipe_file, {**TINY, "data.path": str(small_text)})
    recipe.name = "char_shakespeare"
    with pytest.raises(GptzooError) as error:
        gptzoo.train(recipe, run_dir=copy_run(trained_run, tmp_path), resume=True)
    # Stacked layers (the recipe's): the layer axis that differs is named.
    assert "does not fit the recipe" in str(error.value)
    assert ("blocks.layers.attention.qkv.bias (1, 96); the recipe builds (2, 96)"
            in str(error.value))


def test_a_second_ctrl_c_stops_at_once_and_leaves_a_resumable_run(tmp_path, small_text):
    recipe, run_dir = tiny_recipe(small_text), tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        gptzoo.train(recipe, run_dir=run_dir, reporter=SigintAt(15, 2, 30, 0))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert Checkpoints(run_dir).manager.all_steps() == [10]  # no save after the second Ctrl-C
    result = gptzoo.train(recipe, run_dir=run_dir, resume=True)
    assert result.step == 30 and not result.interrupted


def test_ctrl_c_in_the_final_evaluation_keeps_the_saved_run(tmp_path, small_text, monkeypatch):
    def interrupted_evaluate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return evaluate(*args, **kwargs)

    evaluate = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", interrupted_evaluate)
    result = gptzoo.train(tiny_recipe(small_text), run_dir=tmp_path / "run")
    assert result.interrupted and result.step == 30 and result.val_loss is None
    assert Checkpoints(tmp_path / "run").latest_step() == 30


def test_an_unwritable_run_directory_fails_before_training(tmp_path, small_text):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run directory's parent should be")
    result = gptzoo_cli("train", RECIPE, *set_args({**TINY, "data.path": str(small_text)}),
                        "--run-dir", blocker / "run")
    assert result.returncode == 1 and "training" not in result.stdout
    assert result.stderr.startswith(f"error: cannot write the run directory {blocker / 'run'}")
    assert len(result.stderr.strip().splitlines()) == 1


# The file-size limit stands in for a full disk (a root process writes through chmod); set in the
# child itself, since forking a process that runs JAX threads can deadlock.
LIMITED_CLI = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, 16_384)); "
               "from gptzoo.cli import main; main()")


def test_a_save_that_runs_out_of_space_keeps_the_previous_checkpoint(tmp_path, trained_run,
                                                                     small_text):
    run_dir = copy_run(trained_run, tmp_path)
    args = set_args({**TINY, "data.path": str(small_text), "trainer.max_steps": "40"})
    command = [sys.executable, "-c", LIMITED_CLI, "train", RECIPE, *args, "--run-dir", run_dir,
               "--resume"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 1
    # orbax's writer threads may print tracebacks of their own around the one error line.
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith("error: could not save checkpoint step 40")
    assert "(File too large); step 30 is intact" in errors[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["10", "20", "30"]
    model, _ = gptzoo.load(run_dir)
    reference, _ = gptzoo.load(trained_run)
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_save_is_refused_before_writing_when_the_disk_is_nearly_full(tmp_path, monkeypatch):
    checkpoints = Checkpoints(tmp_path)
    state = {"count": jnp.zeros(())}
    checkpoints.save(1, Pair(jnp.zeros(4), jnp.zeros(4)), state, {})
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=500_000))
    with pytest.raises(GptzooError, match=r"could not save checkpoint step 2 .* MB free\); "
                                          r"step 1 is intact"):
        checkpoints.save(2, Pair(jnp.ones(4), jnp.ones(4)), state, {})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


def test_best_checkpoint_keeps_the_lowest_validation_loss_across_a_resume(tmp_path):
    state = {"count": jnp.zeros(())}

    def offer(best, step, val_loss):
        best.offer(step, val_loss, Pair(jnp.full(2, float(step)), jnp.zeros(2)), state, {})

    best = BestCheckpoint(tmp_path)
    for step, val_loss in [(10, 3.0), (20, 2.5), (30, 2.7)]:
        offer(best, step, val_loss)
    best.close()
    resumed = BestCheckpoint(tmp_path)  # what a resumed run starts from
    assert (resumed.step, resumed.val_loss) == (20, 2.5)
    for step, val_loss, kept in [(40, 2.6, 20), (50, float("nan"), 20), (60, 2.4, 60),
                                 (70, 2.45, 60)]:
        offer(resumed, step, val_loss)
        assert resumed.checkpoints.manager.all_steps() == [kept]  # one step, the lowest
    restored = resumed.checkpoints.restore(60, Pair(jnp.zeros(2), jnp.zeros(2)))
    np.testing.assert_array_equal(restored.first, [60.0, 60.0])


def test_keep_best_makes_a_run_directory_of_the_best_step(tmp_path, small_text, capsys,
                                                          monkeypatch):
    # A tiny run's losses only fall; scripted ones rise after step 20 as an overfitting run's do.
    scripted = {10: 3.0, 20: 2.0, 30: 2.5}
    monkeypatch.setattr(Prepared, "validation_estimate",
                        lambda p, model, step, eval_steps: {"val_loss": scripted[step]})
    run_dir = tmp_path / "run"
    gptzoo.train(tiny_recipe(small_text, **{"trainer.keep_best": "true"}), run_dir=run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in records if "val_loss" in r] == [3.0, 2.0, 2.5]
    assert Checkpoints(run_dir / "best").manager.all_steps() == [20]
    assert f"at step 20: {run_dir / 'best'}" in capsys.readouterr().out
    model, _ = gptzoo.load(run_dir / "best")  # as sample, eval and export-hf read it
    expected = Checkpoints(run_dir).restore(20, model)
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    result = gptzoo_cli("eval", "--ckpt", run_dir / "best")
    assert result.returncode == 0 and result.stdout.startswith("val loss"), result.stderr


def test_a_new_run_refuses_a_directory_with_a_best_checkpoint(tmp_path, small_text):
    (tmp_path / "run" / "best" / "checkpoints" / "10").mkdir(parents=True)
    with pytest.raises(GptzooError, match="already holds checkpoints; pass --resume"):
        gptzoo.train(tiny_recipe(small_text), run_dir=tmp_path / "run")
