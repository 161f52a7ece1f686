"""SIGKILL mid-save, mid-start and at random moments, then --resume: the run still ends exactly
where an uninterrupted one does (three chosen kills in every test run; twenty random ones in
`nox -s slow`); metrics.jsonl after a kill."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import RECIPE, ROOT, TINY, gptzoo_cli, set_args

import gptzoo
from gptzoo.errors import GptzooError
from gptzoo.trainer.metrics_file import MetricsLog

KILLS = 20


def complete_steps(run_dir) -> list[int]:
    folder = run_dir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() \
        else []


def partial_saves(run_dir) -> set[tuple[str, int]]:
    """The temporary folders of saves cut short (or under way), with their modification times.
    A save under way renames its folder at any moment: one gone between listing and reading its
    time is not a partial save."""
    found = set()
    for path in (run_dir / "checkpoints").glob("*.orbax-*"):
        try:
            found.add((path.name, path.stat().st_mtime_ns))
        except FileNotFoundError:
            continue
    return found


def metrics(run_dir) -> list[tuple]:
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"], r["grad_norm"], r.get("val_loss")) for r in records]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path, small_text):
    # A checkpoint every 5 steps of a tiny model: most of the training time is spent saving.
    args = ["train", RECIPE, *set_args({
        **TINY, "data.path": str(small_text), "trainer.max_steps": "400",
        "trainer.checkpoint_interval": "5", "trainer.keep_checkpoints": "2",
        "trainer.eval_interval": "100"})]
    # The uninterrupted run fills a compilation cache that the killed runs read: seconds each.
    env = {"JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    gptzoo_cli(*args, "--run-dir", whole, env=env, check=True)

    command = [sys.executable, "-m", "gptzoo", *map(str, args),
               "--run-dir", str(killed)]
    rng = random.Random(2026)
    startup, in_save, in_startup, stopped_at = 5.0, 0, 0, []
    for _ in range(KILLS):
        resume = ["--resume"] if complete_steps(killed) else []
        before = partial_saves(killed)
        started = time.perf_counter()
        process = subprocess.Popen([*command, *resume], cwd=ROOT, env={**os.environ, **env},
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if rng.random() < 0.25:  # while it restores, rewrites metrics.jsonl, copies the recipe
            time.sleep(rng.uniform(0, startup))
            in_startup += 1
        else:  # once a step is logged (compiled, training): while it trains, logs and saves
            line = ""
            while not line.startswith("step"):
                line = process.stdout.readline()
                assert line, process.stdout.read()
                if line.startswith("training"):
                    startup = time.perf_counter() - started
            time.sleep(rng.uniform(0, 1.5))
        assert process.poll() is None, "the run ended before its kill: make it longer"
        process.send_signal(signal.SIGKILL)
        process.communicate()
        in_save += bool(partial_saves(killed) - before)
        stopped_at.append((complete_steps(killed) or [0])[-1])

    final = gptzoo_cli(*command[3:], "--resume", env=env)
    assert final.returncode == 0, final.stdout + final.stderr
    print(f"{KILLS} kills ({in_save} inside a save, {in_startup} before training), newest "
          f"checkpoints after each: {stopped_at}; final resume reached step "
          f"{complete_steps(killed)[-1]}")
    assert in_save >= 3
    assert metrics(killed) == metrics(whole)
    model_a, _ = gptzoo.load(killed)
    model_b, _ = gptzoo.load(whole)
    for a, b in zip(jax.tree.leaves(model_a), jax.tree.leaves(model_b), strict=True):
        np.testing.assert_array_equal(a, b)


def kill_when(command: list[str], log, ready, timeout: float = 120.0) -> None:
    """Start `command` (output to the file `log`) and SIGKILL it as soon as `ready()` holds,
    polling every millisecond; fails if it ends first."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.perf_counter() + timeout
    while not ready():
        assert process.poll() is None, "the run ended before its kill: make it longer"
        assert time.perf_counter() < deadline, "the moment to kill it never came"
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_sigkill_mid_save_and_mid_start_then_resume_equals_an_uninterrupted_run(tmp_path,
                                                                                small_text):
    """The short version of the test above, for every CI run: three kills at chosen moments (a
    save's temporary folder on disk; a resumed run just restored; a save again), then --resume."""
    overrides = {**TINY, "data.path": str(small_text), "trainer.max_steps": "40",
                 "trainer.checkpoint_interval": "5", "trainer.keep_checkpoints": "2",
                 "trainer.eval_interval": "20"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # In this process: compiles into the session's persistent cache, which the children read.
    gptzoo.train(gptzoo.load_recipe(RECIPE, overrides), run_dir=whole)
    command = [sys.executable, "-m", "gptzoo", "train", str(RECIPE), *set_args(overrides),
               "--run-dir", str(killed)]
    log = (tmp_path / "log.txt").open("w")
    before: set = set()

    def saving() -> bool:  # a save newer than those cut short before, after a complete one
        return (killed / "checkpoints").is_dir() and bool(complete_steps(killed)) \
            and bool(partial_saves(killed) - before)

    def restored() -> bool:
        return "training char_shakespeare" in (tmp_path / "log.txt").read_text()

    for ready, resume in ((saving, []), (restored, ["--resume"]), (saving, ["--resume"])):
        before, steps = partial_saves(killed) if resume else set(), complete_steps(killed)
        log.truncate(0)
        kill_when([*command, *resume], log, ready)
        assert ready is restored or partial_saves(killed) - before, "killed after the save"
        assert complete_steps(killed)[-1] >= (steps or [0])[-1]
    final = subprocess.run([*command, "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert final.returncode == 0, final.stdout + final.stderr
    assert metrics(killed) == metrics(whole)
    model_a, _ = gptzoo.load(killed)
    model_b, _ = gptzoo.load(whole)
    for a, b in zip(jax.tree.leaves(model_a), jax.tree.leaves(model_b), strict=True):
        np.testing.assert_array_equal(a, b)


def test_resuming_metrics_drops_later_records_and_a_cut_short_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "train_loss": 1.0}) for s in (5, 10, 15)]
    path.write_text("\n".join(lines) + '\n{"step": 20, "train_lo')  # killed mid-write
    MetricsLog(path, resume_step=10)
    assert path.read_text() == "".join(ln + "\n" for ln in lines[:2])
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left
    path.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    with pytest.raises(GptzooError, match="metrics.jsonl line 2 is not JSON"):
        MetricsLog(path, resume_step=10)
