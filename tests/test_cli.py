"""The command line end to end, and a one-line error for each kind of bad input."""

import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import (
    EIGHT_DEVICES,
    RECIPE,
    ROOT,
    TINY,
    gptzoo_cli,
    gptzoo_in_process,
    loss_window_by_window,
    set_args,
)

import gptzoo
from gptzoo.trainer.run_dir import training_lock


def imported_modules(stderr: str) -> set[str]:
    """The modules a process imported, from its `PYTHONPROFILEIMPORTTIME` lines."""
    return set(re.findall(r"\| +([\w.]+)$", stderr, flags=re.M))


def test_sample_is_reproducible_and_streams_the_prompt(trained_run):
    """The same seed gives the same text in another process; the rest runs in this one."""
    args = ("sample", "--ckpt", trained_run, "--prompt", "ROMEO:", "--max-new-tokens", "40")
    run = gptzoo_cli(*args, "--seed", "3", env={"PYTHONPROFILEIMPORTTIME": "1"}, check=True)
    first = run.stdout
    assert first.startswith("ROMEO:") and len(first) >= len("ROMEO:") + 40
    # Sampling starts without importing the training loop and what only it needs.
    imported = imported_modules(run.stderr)
    assert "gptzoo.sample" in imported
    assert not imported & {"gptzoo.trainer.loop", "gptzoo.trainer.progress", "rich", "optax"}
    # A second process runs the programs the first stored, tracing none of them, so it never
    # builds the shape checks (nn/_typecheck.py) nor imports beartype for them.
    second = gptzoo_cli(*args, "--seed", "3", check=True,
                        env={"JAX_LOG_COMPILES": "1", "PYTHONPROFILEIMPORTTIME": "1"})
    assert second.stdout == first
    assert not re.findall(r"tracing \w*(prefill|decode_chunk)\b", second.stderr)
    assert "beartype" not in imported_modules(second.stderr)
    assert gptzoo_in_process(*args, "--seed", "3").stdout == first
    assert gptzoo_in_process(*args, "--seed", "4").stdout != first
    greedy = [gptzoo_in_process(*args, "--temperature", "0", "--seed", s).stdout
              for s in ("1", "2")]
    assert greedy[0] == greedy[1] and greedy[0].startswith("ROMEO:")
    two = gptzoo_in_process(*args, "--num-samples", "2", "--top-k", "5").stdout
    assert two.count("ROMEO:") == 2 and "---------------" in two


# An atexit handler registered before the command's own runs after it: in Python's teardown.
_TEARDOWN_PROBE = ("import atexit, sys; atexit.register(print, 'teardown ran', file=sys.stderr); "
                   "from gptzoo.cli import entry; entry()")


def test_sample_leaves_without_python_teardown_once_its_text_is_written(trained_run):
    def gptzoo_probed(*args):
        return subprocess.run([sys.executable, "-c", _TEARDOWN_PROBE, *map(str, args)],
                              capture_output=True, text=True, env={**os.environ,
                                                                   "JAX_PLATFORMS": "cpu"})

    sampled = gptzoo_probed("sample", "--ckpt", trained_run, "--prompt", "ROMEO:",
                            "--max-new-tokens", "20", "--seed", "3")
    assert sampled.returncode == 0 and "teardown ran" not in sampled.stderr
    assert sampled.stdout == gptzoo_in_process("sample", "--ckpt", trained_run, "--prompt",
                                               "ROMEO:", "--max-new-tokens", "20", "--seed",
                                               "3").stdout
    listed = gptzoo_probed("runs", trained_run.parent)  # any other command: the usual exit
    assert listed.returncode == 0 and "teardown ran" in listed.stderr


def test_eval_reports_the_whole_validation_split(trained_run, small_text):
    out = gptzoo_cli("eval", "--ckpt", trained_run, check=True).stdout
    loss, bits = map(float, re.search(r"val loss ([0-9.]+) \| ([0-9.]+) bits", out).groups())
    model, tokenizer = gptzoo.load(trained_run)
    val = tokenizer.encode(small_text.read_text()[-2_000:])  # the last 10% of the characters
    expected, count = loss_window_by_window(model, val, block_size=32, n_predicted=32)
    assert count == 2_000 - 1  # every character but the first is scored
    assert loss == pytest.approx(expected, abs=1e-4)
    assert bits == pytest.approx(expected / 0.6931471805599453, abs=1e-3)
    assert f"| {count:,} tokens" in out


def test_a_second_training_run_reads_its_programs_from_the_compile_cache(tmp_path, small_text):
    """`gptzoo train` keeps what it compiles under GPTZOO_COMPILE_CACHE (JAX's persistent cache,
    when the user names none of their own): the same recipe again reads its train chunk from it."""
    env = {"GPTZOO_COMPILE_CACHE": str(tmp_path / "cache"), "JAX_COMPILATION_CACHE_DIR": "",
           "JAX_LOG_COMPILES": "1"}
    tiny = set_args({**TINY, "data.path": str(small_text), "trainer.max_steps": "10"})
    first = gptzoo_cli("train", RECIPE, *tiny, "--run-dir", tmp_path / "a", env=env, check=True)
    hit = "Persistent compilation cache hit for 'jit_train_chunk'"
    assert hit not in first.stderr and any((tmp_path / "cache" / "jax").iterdir())
    second = gptzoo_cli("train", RECIPE, *tiny, "--run-dir", tmp_path / "b", env=env, check=True)
    assert hit in second.stderr


def test_keys_lists_every_required_key():
    out = gptzoo_in_process("keys", RECIPE).stdout
    for key in ("trainer.max_steps", "trainer.batch_size", "trainer.eval_interval",
                "trainer.eval_steps", "trainer.checkpoint_interval", "trainer.seed", "optimizer.lr",
                "model.n_layers", "model.n_heads", "model.d_model", "model.block_size",
                "model.dropout", "data.path"):
        assert f"{key}=" in out


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def train(*args, overrides=None, cli=gptzoo_in_process):
    return cli("train", RECIPE, *set_args({**TINY, **(overrides or {})}), *args)


def test_recipe_errors(tmp_path):
    assert_one_line_error(gptzoo_in_process("train", tmp_path / "nope.py"), "does not exist")
    broken = tmp_path / "broken.py"
    broken.write_text("from gptzoo.recipe import ModelConfig\n\nmodel = ModelConfig(\n"
                      "    n_layers=undefined_name)\n")
    assert_one_line_error(gptzoo_in_process("train", broken), "broken.py line 4", "NameError")
    broken.write_text("model = (\n")
    assert_one_line_error(gptzoo_in_process("train", broken), "SyntaxError")
    assert_one_line_error(train(overrides={"trainer.max_stepz": "3"}),
                          "trainer.max_stepz", "did you mean trainer.max_steps?")
    assert_one_line_error(train(overrides={"trainer.max_steps": "abc"}),
                          "trainer.max_steps must be int")
    assert_one_line_error(gptzoo_in_process("train", RECIPE, "--set", "trainer.max_steps"),
                          "KEY=VALUE")
    assert_one_line_error(train(overrides={"model.n_heads": "3"}),
                          "d_model=32 is not divisible by n_heads=3")
    assert_one_line_error(train(overrides={"model.dropout": "1.5"}), "model.dropout")
    assert_one_line_error(train(overrides={"mesh.cpu_devices": "0"}), "mesh.cpu_devices")
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert_one_line_error(gptzoo_in_process("train", folder), "is a folder")
    named_otherwise = tmp_path / "recipe.txt"  # Python whatever its name ends with
    named_otherwise.write_text(RECIPE.read_text())
    assert gptzoo_in_process("keys", named_otherwise).returncode == 0


@pytest.mark.parametrize("key, value", [
    ("optimizer.lr", "inf"), ("optimizer.grad_clip", "-1"), ("optimizer.beta1", "1.5"),
    ("optimizer.beta2", "-0.5"), ("optimizer.min_lr_ratio", "2"),
    ("optimizer.weight_decay", "-1"), ("optimizer.warmup_steps", "-1"), ("trainer.seed", "-1")])
def test_out_of_range_values_fail_before_anything_is_written(tmp_path, key, value):
    """Each of these trained to completion (gradient ascent for a negative clip) or failed deep
    in NumPy after making the run directory."""
    assert_one_line_error(train("--run-dir", tmp_path / "run", overrides={key: value}),
                          f"{key}=", f"--set {key}=")
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = gptzoo_in_process("train", tmp_path / "nope.py", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_data_errors(tmp_path):
    missing = tmp_path / "missing.txt"
    assert_one_line_error(train(overrides={"data.path": str(missing)}), "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(train(overrides={"data.path": str(empty)}), "is empty")
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.")
    assert_one_line_error(train(overrides={"data.path": str(short)}), "block_size + 1")
    folder = tmp_path / "folder"
    folder.mkdir()
    assert_one_line_error(train(overrides={"data.tokenizer": str(folder)}),
                          "is a folder without a tokenizer.json")


def test_another_runs_tokenizer_names_the_data_it_cannot_encode(tmp_path, trained_run):
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("Ünïcödé " * 200)
    assert_one_line_error(train(overrides={"data.path": str(foreign),
                                           "data.tokenizer": str(trained_run)}),
                          f"data.path={foreign}", "'Üéïö'", f"data.tokenizer (now {trained_run})")
    assert_one_line_error(gptzoo_in_process("eval", "--ckpt", trained_run, "--data",
                                            tmp_path / "missing.txt"), "pass --data")


def test_checkpoint_errors(tmp_path, trained_run):
    assert_one_line_error(gptzoo_in_process("sample", "--ckpt", tmp_path / "nope"),
                          "does not exist")
    (tmp_path / "a_file").write_text("")
    assert_one_line_error(gptzoo_in_process("sample", "--ckpt", tmp_path / "a_file"),
                          "is a file, not a run directory")
    step = next((trained_run / "checkpoints").iterdir())
    assert_one_line_error(gptzoo_in_process("eval", "--ckpt", step),
                          "is one checkpoint of a run", f"pass the run directory, {trained_run}")
    (tmp_path / "empty_run").mkdir()
    assert_one_line_error(gptzoo_in_process("eval", "--ckpt", tmp_path / "empty_run"),
                          "no checkpoints")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(trained_run, corrupt)
    for step_dir in (corrupt / "checkpoints").iterdir():  # a corrupt newest alone falls back
        for path in (step_dir / "model").rglob("*"):
            if path.is_file():
                path.write_bytes(b"\0garbage")
    assert_one_line_error(gptzoo_in_process("sample", "--ckpt", corrupt), "corrupt")


def test_existing_work_is_never_lost(tmp_path, small_text):
    run_dir = tmp_path / "run"
    data = {"data.path": str(small_text), "trainer.max_steps": "10"}
    assert train("--run-dir", run_dir, overrides=data, cli=gptzoo_cli).returncode == 0
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert_one_line_error(train("--run-dir", run_dir, overrides=data), "--resume")
    assert_one_line_error(train("--run-dir", run_dir, "--resume",
                                overrides={**data, "model.d_model": "64"}),
                          "changed model", "model.d_model=64")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == saved
    assert gptzoo_in_process("sample", "--ckpt", run_dir, "--max-new-tokens", "5").returncode == 0
    assert_one_line_error(train("--run-dir", tmp_path / "fresh", "--resume", overrides=data),
                          "no checkpoint")
    assert not (tmp_path / "fresh").exists()  # a run that failed before writing leaves nothing


def test_a_second_training_into_a_run_directory_is_refused_while_the_first_runs(
        tmp_path, small_text):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "gptzoo", "train", RECIPE, *set_args(
        {**TINY, "data.path": str(small_text), "trainer.max_steps": "100000"}),
        "--run-dir", run_dir], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        lines = iter(first.stdout.readline, "")
        assert any(line.startswith("training") for line in lines)  # it holds the folder
        assert_one_line_error(train("--run-dir", run_dir, overrides={
            "data.path": str(small_text)}), f"{run_dir} is being trained by gptzoo train (pid "
                                            f"{first.pid}", "another --run-dir")
    finally:
        first.kill()
        first.wait()
    with training_lock(run_dir):  # the lock went with its process
        pass


def test_sampling_errors(trained_run):
    def sample(*args):
        return gptzoo_in_process("sample", "--ckpt", trained_run, *args)

    assert_one_line_error(sample("--prompt", "ROMEO: \u263a"), "outside the model's vocabulary")
    assert_one_line_error(sample("--max-new-tokens", "-1"), "--max-new-tokens")
    assert_one_line_error(sample("--temperature", "-0.5"), "--temperature")
    assert_one_line_error(sample("--top-k", "0"), "--top-k")


BROKEN_RECIPE = '''
import equinox as eqx

from gptzoo import nn
from gptzoo.models import gpt2
from gptzoo.recipe import ModelConfig

model = ModelConfig()


def build_model(model, vocab_size, *, key):
    {body}
'''


def broken_recipe(tmp_path, body: str):
    path = tmp_path / "broken_recipe.py"
    path.write_text(BROKEN_RECIPE.format(body=body))
    return path


def test_other_exceptions_reach_the_command_line_as_one_line(tmp_path, small_text):
    recipe = broken_recipe(tmp_path, 'raise RuntimeError("the GPU caught fire")')
    args = ("train", recipe, *set_args({**TINY, "data.path": str(small_text)}),
            "--run-dir", tmp_path / "run")
    result = gptzoo_in_process(*args)
    assert result.returncode == 1
    assert result.stderr == ("error: RuntimeError: the GPU caught fire "
                             "(--debug shows the traceback)\n")
    result = gptzoo_in_process(*args, "--debug")
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert 'raise RuntimeError("the GPU caught fire")' in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: RuntimeError: the GPU caught fire")


def test_a_shape_error_names_the_dimension_and_sizes_on_the_command_line(tmp_path, small_text):
    """A component whose width disagrees with the model's: the one line says which dimension,
    which sizes and where, not jaxtyping's generic opening line."""
    recipe = broken_recipe(tmp_path, "gpt = gpt2(vocab_size, **vars(model), key=key)\n"
                           "    return eqx.tree_at(lambda m: m.final_norm, gpt, "
                           "nn.LayerNorm(model.d_model + 1))")
    result = gptzoo_in_process("train", recipe, *set_args({**TINY, "data.path": str(small_text)}),
                               "--run-dir", tmp_path / "run")
    assert_one_line_error(
        result, "error: ShapeError: weight float32[33] against Float[Array, 'd_model']: the size "
        "of dimension d_model is 33 which does not equal the existing value of 32, bound by x "
        "float32[8, 32, 32] (in layer_norm)")
    assert result.returncode == 1


def test_a_batch_that_does_not_split_over_the_devices_is_refused(tmp_path, small_text):
    result = gptzoo_cli("train", RECIPE, *set_args({**TINY, "trainer.batch_size": "12",
                                                    "data.path": str(small_text)}),
                        "--run-dir", tmp_path / "run",
                        env=EIGHT_DEVICES)
    assert_one_line_error(result, "trainer.batch_size=12 does not split over 8 devices",
                          "use a multiple of 8")
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any step
