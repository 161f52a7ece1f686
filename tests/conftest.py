import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "char_shakespeare.py"
SHAKESPEARE = ROOT / "gptzoo" / "data" / "tinyshakespeare.txt"

# A small override of the real recipe: seconds to train on a 2-core CPU.
TINY = {"model.n_layers": "1", "model.d_model": "32", "model.n_heads": "2",
        "model.block_size": "32", "trainer.batch_size": "8", "trainer.max_steps": "30",
        "trainer.eval_interval": "10", "trainer.eval_steps": "2",
        "trainer.checkpoint_interval": "10", "trainer.log_interval": "5",
        "trainer.steps_per_call": "5"}


def set_args(overrides: dict[str, str]) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]


def gptzoo_cli(*args, env=None, check=False, timeout=600) -> subprocess.CompletedProcess:
    """Run the installed `gptzoo` command the way a user does."""
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    command = [sys.executable, "-c", "from gptzoo.cli import main; main()", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=full_env, check=check,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="session", autouse=True)
def corpus_cache(tmp_path_factory) -> Path:
    """Token shards go to a temporary cache (children inherit it), not ~/.cache/gptzoo."""
    os.environ["GPTZOO_CACHE"] = str(tmp_path_factory.mktemp("gptzoo_cache"))
    return Path(os.environ["GPTZOO_CACHE"])


@pytest.fixture(scope="session")
def small_text(tmp_path_factory) -> Path:
    """The first 20,000 characters of tiny Shakespeare: fast to encode, every common character."""
    path = tmp_path_factory.mktemp("data") / "shakespeare_20k.txt"
    path.write_text(SHAKESPEARE.read_text()[:20_000])
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, small_text) -> Path:
    """One tiny run of the real recipe through the CLI, shared by the sampling and eval tests."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    gptzoo_cli("train", RECIPE, *set_args({**TINY, "data.path": str(small_text)}),
               "--run-dir", run_dir, check=True)
    return run_dir
