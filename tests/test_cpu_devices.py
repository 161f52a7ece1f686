"""`mesh.cpu_devices`: training splits a CPU into that many JAX devices before JAX starts, the
batch split over them, and trains as one device does and resumes bit for bit; where the devices
are already chosen it keeps them, and where a micro-batch would not split, as many as divide."""

import os
import shutil
import subprocess
import sys

import equinox as eqx
import jax
import numpy as np
import pytest
from conftest import RECIPE, ROOT, TINY, gptzoo_cli, set_args

import gptzoo
from gptzoo.trainer.metrics_file import read_records

# The devices a fresh process ends with after `split_cpu` of the recipe with these overrides.
DEVICES_AFTER_SPLIT = """
import sys, jax
from gptzoo.recipe import load_recipe
from gptzoo.trainer.distributed import split_cpu
if sys.argv[1] == "started":
    jax.numpy.zeros(1)
recipe = load_recipe(sys.argv[2], dict(a.split("=", 1) for a in sys.argv[3:]))
split_cpu(recipe)
print(jax.device_count())
"""


def devices_after_split(*overrides: str, started: bool = False, env: dict | None = None
                        ) -> tuple[int, str]:
    """(devices, what `split_cpu` printed) in a fresh CPU process."""
    result = subprocess.run(
        [sys.executable, "-c", DEVICES_AFTER_SPLIT, "started" if started else "fresh", RECIPE,
         *overrides],
        capture_output=True, text=True, check=True, cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
    *said, count = result.stdout.strip().splitlines()
    return int(count), "\n".join(said)


@pytest.mark.parametrize(("overrides", "env", "expected"), [
    (("mesh.cpu_devices=2", "trainer.batch_size=8"), None, 2),
    (("mesh.cpu_devices=4", "trainer.batch_size=8", "trainer.grad_accum_steps=2"), None, 4),
    # chosen already: by JAX's own setting, by XLA's flag
    (("mesh.cpu_devices=2",), {"JAX_NUM_CPU_DEVICES": "3"}, 3),
    (("mesh.cpu_devices=2",), {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}, 3),
])
def test_the_cpu_splits_where_nothing_chose_its_devices(overrides, env, expected):
    assert devices_after_split(*overrides, env=env) == (expected, "")


def test_a_started_jax_keeps_its_device_and_says_so():
    assert devices_after_split("mesh.cpu_devices=2", started=True) == (
        1, "mesh.cpu_devices=2: JAX had already started with 1 CPU device(s), which this run "
        "trains on (its losses match a run on other devices to rounding, not bit for bit)")


def test_a_micro_batch_that_does_not_split_keeps_the_devices_that_divide_it():
    count, said = devices_after_split("mesh.cpu_devices=4", "trainer.batch_size=12",
                                      "trainer.grad_accum_steps=2")  # micro-batches of 6
    assert count == 2
    assert said == ("mesh.cpu_devices=4 does not divide every micro-batch; the CPU is split "
                    "into 2 device(s)")


def test_two_cpu_devices_train_as_one(tmp_path, small_text):
    """The batch split over two CPU devices (gradients summed across them) gives the losses of
    one device's run, to float32 rounding."""
    settings = {**TINY, "data.path": str(small_text), "trainer.max_steps": "10",
                "trainer.log_interval": "1"}
    runs = {}
    for n in (1, 2):
        run_dir = tmp_path / f"devices{n}"
        result = gptzoo_cli("train", RECIPE, *set_args({**settings, "mesh.cpu_devices": str(n)}),
                            "--run-dir", run_dir, check=True)
        assert f"{n} cpu device(s) in 1 process(es)" in result.stdout
        runs[n] = [r["train_loss"] for r in read_records(run_dir) if "train_loss" in r]
    assert len(runs[1]) == 10
    assert runs[2] == pytest.approx(runs[1], rel=1e-5)


def test_a_run_on_two_cpu_devices_resumes_bit_for_bit(tmp_path, small_text):
    """Resumed from its step-5 checkpoint (the newer one deleted), the run logs the losses and
    ends with the weights of the uninterrupted run: the resumed process splits the CPU alike."""
    args = set_args({**TINY, "data.path": str(small_text), "trainer.max_steps": "10",
                     "trainer.checkpoint_interval": "5", "trainer.log_interval": "1",
                     "mesh.cpu_devices": "2"})
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    gptzoo_cli("train", RECIPE, *args, "--run-dir", whole, check=True)
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "10")
    result = gptzoo_cli("train", RECIPE, *args, "--run-dir", resumed, "--resume", check=True)
    assert "2 cpu device(s)" in result.stdout
    losses = [[(r["step"], r["train_loss"]) for r in read_records(run) if "train_loss" in r]
              for run in (resumed, whole)]
    assert losses[0] == losses[1] and len(losses[0]) == 10
    for a, b in zip(*(jax.tree.leaves(eqx.filter(gptzoo.load(run)[0], eqx.is_array))
                      for run in (resumed, whole)), strict=True):
        np.testing.assert_array_equal(a, b)
