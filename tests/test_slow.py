"""Full-length trainings: `nox -s slow` (about 10 minutes on a 2-core CPU), not `nox -s tests`."""

import re
import subprocess
import time

import pytest


@pytest.mark.slow
def test_default_recipe_reaches_its_validation_bar(tmp_path):
    run_dir = tmp_path / "char_shakespeare"
    started = time.perf_counter()
    subprocess.run(["gptzoo", "train", "recipes/char_shakespeare.py", "--run-dir", str(run_dir)],
                   check=True)
    minutes = (time.perf_counter() - started) / 60
    report = subprocess.run(["gptzoo", "eval", "--ckpt", str(run_dir)], check=True,
                            capture_output=True, text=True).stdout
    val_loss = float(re.search(r"val loss ([0-9.]+)", report).group(1))
    print(f"default recipe: {minutes:.1f} min, {report.strip()}")
    assert val_loss <= 1.55
