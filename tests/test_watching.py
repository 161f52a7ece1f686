"""Watching runs: the metrics sinks (metrics.jsonl, TensorBoard, W&B), `wall_time`, status.json,
the progress bar, `gptzoo plot` and `gptzoo runs`."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import RECIPE, ROOT, TINY, gptzoo_cli, gptzoo_in_process, set_args
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptzoo.errors import GptzooError
from gptzoo.plot import plot_runs
from gptzoo.recipe import load_recipe
from gptzoo.trainer.metrics_file import MetricsLog
from gptzoo.trainer.progress import Reporter
from gptzoo.trainer.run_status import RunStatus
from gptzoo.trainer.sinks import TensorBoardSink, open_sinks


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def status(run_dir):
    return json.loads((run_dir / "status.json").read_text())


def scalars(run_dir, tag):
    events = EventAccumulator(str(run_dir))  # what `tensorboard --logdir` reads
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, trained_run, small_text):
    """The shared tiny run as if killed after logging step 30 but before saving it, resumed."""
    run_dir = tmp_path_factory.mktemp("resumed") / "resumed"
    shutil.copytree(trained_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "30")
    before = records(run_dir)
    gptzoo_cli("train", RECIPE, *set_args({**TINY, "data.path": str(small_text)}),
               "--run-dir", run_dir, "--resume", check=True)
    return run_dir, before


def test_tensorboard_shows_every_record(trained_run):
    logged = records(trained_run)
    tags = {"loss/train": "train_loss", "loss/val": "val_loss", "optim/lr": "lr",
            "speed/tokens_per_sec": "tokens_per_sec", "speed/wall_time": "wall_time"}
    for tag, key in tags.items():
        want = {r["step"]: r[key] for r in logged if r.get(key) is not None}
        got = scalars(trained_run, tag)
        assert sorted(got) == sorted(want), tag
        assert got == pytest.approx(want, rel=1e-6), tag  # event files store float32
    assert sorted(scalars(trained_run, "loss/val")) == [10, 20, 30]


def test_tensorboard_sees_a_record_within_seconds_while_the_run_goes_on(tmp_path):
    """The sink hands records to tensorboardX's writer thread, which writes them to disk within
    about a second without `close()` or a flush in the training loop: a live run is followed."""
    sink = TensorBoardSink(tmp_path, None)
    try:
        sink.write({"step": 7, "train_loss": 2.5})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if scalars(tmp_path, "loss/train") == {7: 2.5}:
                    return
            except KeyError:  # no event file with the tag yet
                pass
            time.sleep(0.1)
        pytest.fail("the record did not reach the event file within 10 s")
    finally:
        sink.close()


def test_records_carry_wall_time_and_the_run_its_status(trained_run):
    times = [r["wall_time"] for r in records(trained_run)]
    assert len(times) == 6 and 0 < times[0] and times == sorted(times)
    done = status(trained_run)
    assert done["status"] == "finished" and done["step"] == 30 and done["parameters"] > 0
    assert done["wall_time"] >= times[-1] and done["val_loss"] < 4.2


def test_the_tensorboard_sink_does_not_import_torch(tmp_path):
    """tensorboardX would import torch (seconds) whenever it is installed, as it is here."""
    script = ("import sys; from pathlib import Path; from gptzoo.trainer.sinks import "
              "TensorBoardSink; TensorBoardSink(Path(sys.argv[1]), None).close(); "
              "import importlib.util; assert importlib.util.find_spec('torch'); "
              "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_resume_continues_wall_time_and_tensorboard_keeps_one_value_per_step(resumed_run):
    run_dir, before = resumed_run
    after = records(run_dir)
    assert [r["step"] for r in after] == [5, 10, 15, 20, 25, 30]
    assert after[:4] == before[:4]  # kept as logged; 25 and 30 logged again after the resume
    assert after[4]["wall_time"] > after[3]["wall_time"]
    assert after[4]["wall_time"] != before[4]["wall_time"]
    assert scalars(run_dir, "speed/wall_time") == pytest.approx(
        {r["step"]: r["wall_time"] for r in after}, rel=1e-6)


def test_wall_time_continues_from_the_last_record(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "wall_time": 100.0}\n'
                                            '{"step": 20, "wall_time": 250.5}\n')
    resumed = RunStatus.begin(tmp_path, resume=True, parameters=1)
    assert 250.5 <= resumed.wall_time() < 260
    assert RunStatus.begin(tmp_path, resume=False, parameters=1).wall_time() < 10
    assert status(tmp_path)["status"] == "running"


def test_wandb_missing_is_one_clear_error_before_any_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    recipe = load_recipe(RECIPE, {"trainer.wandb": "true"})
    metrics = MetricsLog(tmp_path / "metrics.jsonl", resume_step=None)
    with pytest.raises(GptzooError, match=r"needs the wandb package: pip install -e \.\[wandb\]"):
        open_sinks(recipe, tmp_path, metrics, resume_step=None)
    assert not list(tmp_path.glob("events.out.tfevents.*"))


def test_wandb_without_credentials_logs_offline_into_the_run(tmp_path, monkeypatch):
    """wandb is in the test extra: imported by the sink, not skipped when missing."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc holding a key
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = load_recipe(RECIPE, {"trainer.wandb": "true"})
    metrics = MetricsLog(tmp_path / "metrics.jsonl", resume_step=None)
    sinks = open_sinks(recipe, tmp_path, metrics, resume_step=None)
    sinks.write({"step": 5, "train_loss": 4.0625, "lr": 1e-3, "tokens_per_sec": None})
    sinks.close()
    offline = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    (log,) = offline[0].glob("run-*.wandb")
    # The history record, a protobuf holding each key and its value as JSON, in the run's log,
    # which W&B's own process may still be writing when `finish` returns.
    deadline = time.perf_counter() + 30
    while b"4.0625" not in log.read_bytes() and time.perf_counter() < deadline:
        time.sleep(0.1)
    assert b"train_loss" in log.read_bytes() and b"4.0625" in log.read_bytes()


def test_progress_bar_keeps_the_last_val_loss_and_speed():
    out = io.StringIO()
    reporter = Reporter(30, 0, Console(file=out, force_terminal=True, width=160))
    reporter.log({"step": 10, "train_loss": 3.5, "lr": 1e-3, "tokens_per_sec": 1234.0,
                  "val_loss": 3.25})
    reporter.log({"step": 15, "train_loss": 3.125, "lr": 1e-3, "tokens_per_sec": None})
    reporter.close()
    assert "loss 3.1250 | val 3.2500 | 1,234 tok/s" in out.getvalue()
    assert "eta" in out.getvalue()


def test_plain_lines_keep_their_format(capsys):
    reporter = Reporter(30, 0, Console(file=io.StringIO(), force_terminal=False))
    reporter.log({"step": 10, "train_loss": 3.5, "lr": 1e-3, "tokens_per_sec": 1234.0,
                  "val_loss": 3.25, "wall_time": 7.0})
    line = capsys.readouterr().out
    assert line.startswith("step     10/30 | loss 3.5000 | val 3.2500 | lr 1.00e-03 | "
                           "1,234 tok/s | eta ")


def test_plot_draws_each_run(tmp_path, trained_run, resumed_run):
    runs = [trained_run, resumed_run[0]]
    fig = plot_runs(runs)
    step_ax, time_ax, lr_ax, speed_ax = fig.axes
    labels = [line.get_label() for line in step_ax.lines]
    assert labels == ["tiny train", "tiny val", "resumed train", "resumed val"]
    logged = records(trained_run)
    assert list(step_ax.lines[1].get_xdata()) == [10, 20, 30]
    assert list(step_ax.lines[1].get_ydata()) == [r["val_loss"] for r in logged if "val_loss" in r]
    assert list(time_ax.lines[0].get_xdata()) == [r["wall_time"] for r in logged]
    assert list(lr_ax.lines[0].get_ydata()) == [r["lr"] for r in logged]
    assert len(speed_ax.lines) == 2 and "wall-clock" in time_ax.get_xlabel()
    out = tmp_path / "new_folder" / "curves.png"  # made if missing
    assert gptzoo_in_process("plot", *runs, "--out", out).returncode == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def start_training(run_dir, small_text, recipe=RECIPE):
    """A long tiny run in the background, once it has logged its first record."""
    args = set_args({**TINY, "data.path": str(small_text), "trainer.max_steps": "100000"})
    command = [sys.executable, "-m", "gptzoo", "train", str(recipe),
               *args, "--run-dir", str(run_dir)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL,
                               env={**os.environ, "JAX_PLATFORMS": "cpu"})
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").is_file() and records(run_dir)):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    return process


BROKEN = """import equinox as eqx
from gptzoo.recipe import ModelConfig

model = ModelConfig(n_layers=1, n_heads=2, d_model=32, block_size=32)


class Broken(eqx.Module):  # a LanguageModel (gptzoo.models.protocol) that fails when run
    block_size: int = eqx.field(static=True, default=32)
    context_window: int = eqx.field(static=True, default=32)

    def n_predicted(self, seq):
        return seq

    def __call__(self, tokens, *, key=None):
        raise ValueError("the model broke on purpose")


def build_model(model, vocab_size, *, key):
    return Broken()
"""


def test_runs_table_shows_each_status(tmp_path, trained_run, small_text):
    root = tmp_path / "runs"
    shutil.copytree(trained_run, root / "done")
    (root / "done" / "best").mkdir()  # trainer.keep_best's run directory: part of its run's row
    shutil.copy(trained_run / "recipe.json", root / "done" / "best")
    interrupted = start_training(root / "stopped", small_text)
    interrupted.send_signal(signal.SIGINT)
    assert interrupted.wait(timeout=300) == 130
    killed = start_training(root / "killed", small_text)
    assert status(root / "killed")["status"] == "running"
    killed.kill()
    killed.wait()
    broken = tmp_path / "broken.py"
    broken.write_text(BROKEN)
    failed = gptzoo_in_process("train", broken, *set_args({"data.path": str(small_text)}),
                               "--run-dir", root / "failed")
    assert failed.returncode == 1
    assert status(root / "failed")["error"] == "ValueError: the model broke on purpose"

    out = gptzoo_in_process("runs", root).stdout
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("│")}
    assert set(rows) == {"done", "stopped", "killed", "failed"}
    done = records(trained_run)
    assert "30 / 30" in rows["done"] and "finished" in rows["done"]
    assert f"{min(r['val_loss'] for r in done if 'val_loss' in r):.4f}" in rows["done"]
    assert f"{status(trained_run)['parameters']:,}" in rows["done"]
    assert "/ 100,000" in rows["stopped"] and "interrupted" in rows["stopped"]
    assert "failed: killed" in rows["killed"]
    assert "failed: ValueError: the model broke on purpose" in rows["failed"]


def test_runs_errors(tmp_path):
    result = gptzoo_in_process("runs", tmp_path / "nope")
    assert result.returncode == 1 and result.stderr.startswith("error: ")
    assert "is not a folder" in result.stderr
