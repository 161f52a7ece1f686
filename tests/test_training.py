"""The trainer: learning, exact resume after Ctrl-C, and data parallelism."""

import json
import shutil
import signal
import subprocess
import sys
import threading
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import EIGHT_DEVICES, RECIPE, ROOT, TINY, SigintAt, gptzoo_cli, set_args

import gptzoo
from gptzoo.data import Prefetcher
from gptzoo.recipe import OptimizerConfig
from gptzoo.trainer.checkpoint import Checkpoints
from gptzoo.trainer.optimizer import make_optimizer
from gptzoo.trainer.progress import Reporter
from gptzoo.trainer.sinks import Sinks

BPE_RECIPE = ROOT / "recipes" / "bpe_shakespeare.py"


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_goes_down_and_metrics_are_logged(tmp_path, small_text):
    recipe = gptzoo.load_recipe(RECIPE, {**TINY, "trainer.max_steps": "60",
                                         "data.path": str(small_text)})
    result = gptzoo.train(recipe, run_dir=tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(5, 61, 5))
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.5
    assert all({"step", "train_loss", "lr", "tokens_per_sec"} <= r.keys() for r in records)
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20, 30, 40, 50, 60]
    assert records[0]["tokens_per_sec"] is None  # the first chunk compiled: not steady state
    assert any(r["tokens_per_sec"] for r in records)
    assert result.val_loss < 3.5 and not result.interrupted
    assert result.val_bpb == pytest.approx(result.val_loss / np.log(2))  # ASCII: a byte a token
    saved = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert saved["trainer"]["max_steps"] == 60 and saved["model"]["d_model"] == 32


class _StillComputing:
    """A chunk's result that an asynchronous device (a GPU) has not finished: reading it waits."""

    def __init__(self, value, seconds: float):
        self.value, self.seconds = value, seconds

    def __array__(self, dtype=None, copy=None):
        time.sleep(self.seconds)
        return np.asarray(self.value, dtype)


def test_tokens_per_sec_includes_waiting_for_a_chunk_the_device_has_not_finished(
        tmp_path, small_text, monkeypatch):
    """On a GPU the train chunk's call returns at once and the log step's read of its losses
    waits for the device: that wait is the chunk's compute and belongs in tokens/s. Simulated
    here by losses that take a second to read (the CPU runs a chunk within its call)."""
    import gptzoo.trainer.loop as loop

    wait = 1.0  # seconds the device "still computes" each chunk after its call returned
    prepare = loop.prepare

    def asynchronous(*args, **kwargs):
        p = prepare(*args, **kwargs)
        chunk = p.train_chunk

        def call(*chunk_args):
            model, opt_state, stats = chunk(*chunk_args)
            return model, opt_state, stats._replace(loss=_StillComputing(stats.loss, wait))

        p.train_chunk = call
        return p

    monkeypatch.setattr(loop, "prepare", asynchronous)
    recipe = gptzoo.load_recipe(RECIPE, {**TINY, "trainer.max_steps": "15",
                                         "data.path": str(small_text)})
    gptzoo.train(recipe, run_dir=tmp_path / "run")
    speeds = [r["tokens_per_sec"] for r in read_metrics(tmp_path / "run") if r["tokens_per_sec"]]
    tokens_per_chunk = 5 * 8 * 32  # steps_per_call x batch_size x block_size
    # The wait counted, and every token of the chunk: the rest of a tiny chunk takes far less.
    assert speeds and all(tokens_per_chunk / (3 * wait) < speed < tokens_per_chunk / wait
                          for speed in speeds)


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(tmp_path, small_text):
    """Ctrl-C arrives once step 15 is logged (in-process, so the moment is deterministic): the run
    saves at the end of its chunk, step 20, between checkpoint intervals, and resumes from it."""
    recipe = gptzoo.load_recipe(RECIPE, {**TINY, "trainer.max_steps": "60",
                                         "trainer.checkpoint_interval": "25",
                                         "data.path": str(small_text)})
    interrupted, whole = tmp_path / "interrupted", tmp_path / "whole"
    stopped = gptzoo.train(recipe, run_dir=interrupted, reporter=SigintAt(15, 1, 60, 0))
    assert stopped.interrupted and stopped.step == 20 and stopped.val_loss is None
    assert read_metrics(interrupted)[-1]["step"] == 20
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["20"]

    gptzoo.train(recipe, run_dir=interrupted, resume=True)
    gptzoo.train(recipe, run_dir=whole)
    assert_same_run(interrupted, whole)


def test_ctrl_c_between_log_steps_then_resume_logs_what_an_uninterrupted_run_logs(
        tmp_path, small_text):
    """Chunks of 3 steps, records every 10: Ctrl-C after the step-10 record stops at the end of
    the chunk, step 12, which logs a record of its own; the resumed run drops it."""
    recipe = gptzoo.load_recipe(RECIPE, {**TINY, "trainer.max_steps": "30",
                                         "trainer.steps_per_call": "3",
                                         "trainer.log_interval": "10",
                                         "trainer.checkpoint_interval": "25",
                                         "data.path": str(small_text)})
    interrupted, whole = tmp_path / "interrupted", tmp_path / "whole"
    stopped = gptzoo.train(recipe, run_dir=interrupted, reporter=SigintAt(10, 1, 30, 0))
    assert stopped.step == 12 and read_metrics(interrupted)[-1]["step"] == 12
    gptzoo.train(recipe, run_dir=interrupted, resume=True)
    gptzoo.train(recipe, run_dir=whole)
    assert_same_run(interrupted, whole)


def assert_same_run(resumed_dir, whole_dir) -> None:
    """The same records (steps, train and validation losses) and bit-identical parameters."""
    resumed, reference = read_metrics(resumed_dir), read_metrics(whole_dir)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    for a, b in zip(resumed, reference, strict=True):
        assert (a["train_loss"], a.get("val_loss")) == (b["train_loss"], b.get("val_loss"))
    model_a, _ = gptzoo.load(resumed_dir)
    model_b, _ = gptzoo.load(whole_dir)
    for a, b in zip(jax.tree.leaves(eqx.filter(model_a, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(model_b, eqx.is_array)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_bpe_run_resumed_after_ctrl_c_equals_an_uninterrupted_one(tmp_path, small_text):
    """A BPE is trained on the training split when a run prepares its corpus. Here every run
    prepares it from an emptied cache, so the resumed run trains its tokenizer again: it must be
    the same one (resume compares it with the checkpoint's) and give the same token shards."""
    cache = tmp_path / "cache"
    recipe = gptzoo.load_recipe(BPE_RECIPE, {
        **TINY, "trainer.max_steps": "40", "trainer.checkpoint_interval": "25",
        "data.path": str(small_text), "data.vocab_size": "300", "data.cache_dir": str(cache)})
    interrupted, whole = tmp_path / "interrupted", tmp_path / "whole"
    stopped = gptzoo.train(recipe, run_dir=interrupted, reporter=SigintAt(15, 1, 40, 0))
    assert stopped.interrupted and stopped.step == 20
    assert json.loads((interrupted / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    for run_dir, resume in ((interrupted, True), (whole, False)):
        shutil.rmtree(cache)
        gptzoo.train(recipe, run_dir=run_dir, resume=resume)
    assert_same_run(interrupted, whole)


def test_ctrl_c_makes_the_command_exit_130_after_saving(tmp_path, small_text):
    args = set_args({**TINY, "trainer.max_steps": "100000", "data.path": str(small_text)})
    command = [sys.executable, "-m", "gptzoo", "train", RECIPE,
               *args, "--run-dir", tmp_path / "run"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    while not process.stdout.readline().startswith("step"):  # a step is logged: in training
        assert process.poll() is None
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 130, output
    assert "continue with --resume" in output
    assert Checkpoints(tmp_path / "run").latest_step() is not None


@pytest.mark.dist  # eight devices: nox -s dist
def test_eight_devices_step_equals_one_device(tmp_path, small_text, trained_run):
    """The shared tiny run (one device) again on eight."""
    eight = gptzoo_cli("train", RECIPE, *set_args({**TINY, "data.path": str(small_text)}),
                       "--run-dir", tmp_path / "eight", check=True,
                       env=EIGHT_DEVICES)
    assert "8 cpu device(s)" in eight.stdout
    a, b = read_metrics(trained_run), read_metrics(tmp_path / "eight")
    assert len(a) == 6 and [r["step"] for r in a] == [r["step"] for r in b]
    np.testing.assert_allclose([r["train_loss"] for r in a], [r["train_loss"] for r in b],
                               rtol=1e-5)
    model_a, _ = gptzoo.load(trained_run)
    model_b, _ = gptzoo.load(tmp_path / "eight")
    for x, y in zip(jax.tree.leaves(eqx.filter(model_a, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(model_b, eqx.is_array)), strict=True):
        # Adam divides by the gradient scale, so near-zero parameters carry float noise ~1e-6.
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_weight_decay_touches_matrices_only():
    params = {"matrix": jnp.ones((2, 2)), "bias": jnp.ones(2), "scale": jnp.ones(2)}
    optimizer = make_optimizer(OptimizerConfig(lr=0.1, warmup_steps=0, weight_decay=0.5), 10)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
    new = optax.apply_updates(params, updates)
    assert float(new["matrix"][0, 0]) < 1.0
    np.testing.assert_array_equal(new["bias"], params["bias"])
    np.testing.assert_array_equal(new["scale"], params["scale"])


class RaiseAt(Reporter):
    """Raises at the record of `step`, as any failure inside the training loop would."""

    def __init__(self, step: int, *args):
        super().__init__(*args)
        self.step = step

    def log(self, record):
        super().log(record)
        if record["step"] == self.step:
            raise RuntimeError("injected failure")


def test_an_exception_mid_run_releases_what_the_run_opened(tmp_path, small_text, monkeypatch):
    """Checkpoint managers (the run's and its best's), metrics sinks (TensorBoard's writer has a
    thread) and the loader's thread are all closed, and no thread the run started is left."""
    opened, closed = [], []
    for cls in (Checkpoints, Sinks, Prefetcher):
        init, close = cls.__init__, cls.close

        def recording_init(self, *args, _init=init, **kwargs):
            _init(self, *args, **kwargs)
            opened.append(self)

        def recording_close(self, _close=close):
            closed.append(self)
            _close(self)

        monkeypatch.setattr(cls, "__init__", recording_init)
        monkeypatch.setattr(cls, "close", recording_close)
    threads = set(threading.enumerate())
    recipe = gptzoo.load_recipe(RECIPE, {**TINY, "data.path": str(small_text),
                                         "trainer.keep_best": "true"})
    with pytest.raises(RuntimeError, match="injected failure"):
        gptzoo.train(recipe, run_dir=tmp_path / "run", reporter=RaiseAt(15, 30, 0))
    assert len(opened) == 4 and {id(o) for o in opened} <= {id(c) for c in closed}
    deadline = time.perf_counter() + 10
    while set(threading.enumerate()) - threads and time.perf_counter() < deadline:
        time.sleep(0.05)
    assert not set(threading.enumerate()) - threads
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and status["error"] == "RuntimeError: injected failure"
