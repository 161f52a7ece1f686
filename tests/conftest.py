import atexit
import gc
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest

from gptzoo.trainer.progress import Reporter

# One persistent compilation cache per test session, for this process and every CLI subprocess
# (they inherit the environment): the tests start dozens of processes that compile the same tiny
# train chunk, evaluation and sampler, and compiling is most of what such a process does. A fresh
# folder per session, so every session compiles from scratch once and nothing outlives it.
_JAX_CACHE = {"JAX_COMPILATION_CACHE_DIR": tempfile.mkdtemp(prefix="gptzoo-tests-jax-cache-"),
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
atexit.register(shutil.rmtree, _JAX_CACHE["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.update(_JAX_CACHE)
for _name, _value in _JAX_CACHE.items():  # jax read its environment when it was imported
    jax.config.update(_name.lower(), _value if _name.endswith("DIR") else int(_value))
# And gptzoo's own (gptzoo.compile_cache), not ~/.cache/gptzoo.
os.environ["GPTZOO_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="gptzoo-tests-sample-cache-")
atexit.register(shutil.rmtree, os.environ["GPTZOO_COMPILE_CACHE"], ignore_errors=True)

# The suite compiles hundreds of small programs and runs most of them for moments, so compiling
# is most of its time. These flags skip LLVM's optimisation passes and XLA's fusion emitters (a
# sampling test measured 16 s -> 7 s, the whole suite 19 -> 8 min; steps run up to 3x slower,
# which its few hundred tiny steps hardly notice). What the tests check does not depend on them.
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")
# For the CLI subprocesses that must see eight devices (a mesh of fake CPU devices).
EIGHT_DEVICES = {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE} "
                              "--xla_force_host_platform_device_count=8"}


def pytest_configure(config):
    """Fast compilation for this process and its children (XLA reads the flags when JAX first
    starts a backend, just below), except in `nox -s slow`: full-length trainings, all run
    time."""
    flags = os.environ.get("XLA_FLAGS", "")
    if config.getoption("markexpr") != "slow" and FAST_COMPILE not in flags:  # xdist: inherited
        os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE}"
    # JAX starts now, so that a `gptzoo train` run in this process (click's runner) keeps its
    # devices whichever test comes first: a recipe's `mesh.cpu_devices` applies only before.
    jax.devices()


# pytest-xdist's workers ignore SIGINT; the Ctrl-C tests need a Python process's own handler.
signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "char_shakespeare.py"
SHAKESPEARE = ROOT / "gptzoo" / "data" / "tinyshakespeare.txt"

# A small override of the real recipe: seconds to train on a 2-core CPU.
TINY = {"model.n_layers": "1", "model.d_model": "32", "model.n_heads": "2",
        "model.block_size": "32", "trainer.batch_size": "8", "trainer.max_steps": "30",
        "trainer.eval_interval": "10", "trainer.eval_steps": "2",
        "trainer.checkpoint_interval": "10", "trainer.log_interval": "5",
        "trainer.steps_per_call": "5",
        # One CPU device, as the test process has: runs of the CLI and of this process compare
        # bit for bit (tests/test_cpu_devices.py trains on two).
        "mesh.cpu_devices": "1"}
# The same, evaluated and saved once at the end, warming up for 5 steps: for tests that look at
# the loss curve rather than at intermediate checkpoints.
TINY_ONE_EVAL = {**TINY, "trainer.eval_interval": "30", "trainer.checkpoint_interval": "30",
                 "optimizer.warmup_steps": "5"}


def set_args(overrides: dict[str, str]) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]


def gptzoo_cli(*args, env=None, check=False, timeout=600) -> subprocess.CompletedProcess:
    """Run the installed `gptzoo` command the way a user does."""
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    command = [sys.executable, "-m", "gptzoo", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=full_env, check=check,
                          timeout=timeout, cwd=ROOT)


def gptzoo_in_process(*args) -> subprocess.CompletedProcess:
    """`gptzoo ARGS` inside the test process (click's runner): the same command, exit status and
    one-line errors, without a new Python importing JAX again (seconds per call). For commands
    that fail early or sample briefly; `gptzoo_cli` where a real process matters."""
    from click.testing import CliRunner

    from gptzoo.cli import main

    absl = logging.getLogger("absl")
    level = absl.level  # the command quietens absl for its own process
    try:
        result = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        absl.setLevel(level)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


@pytest.fixture(scope="module", autouse=True)
def fresh_jax_caches():
    """Empty JAX's in-memory caches after each test file. Every program compiled stays cached,
    holding a few memory maps of machine code: one process compiling the whole suite's programs
    passes the kernel's limit of 65,530 maps (vm.max_map_count) after ~20 minutes and XLA aborts.
    A program a later file compiles again comes back from the persistent cache above."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session", autouse=True)
def corpus_cache(tmp_path_factory) -> Path:
    """Token shards go to a temporary cache (children inherit it), not ~/.cache/gptzoo."""
    os.environ["GPTZOO_CACHE"] = str(tmp_path_factory.mktemp("gptzoo_cache"))
    return Path(os.environ["GPTZOO_CACHE"])


@pytest.fixture
def family_registry():
    """The model-family registry, restored after the test: the families a test (or a page of the
    docs) registers do not outlive it."""
    from gptzoo.models import ARCHITECTURES

    saved = dict(ARCHITECTURES)
    yield ARCHITECTURES
    ARCHITECTURES.clear()
    ARCHITECTURES.update(saved)


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


class SigintAt(Reporter):
    """Sends this process `times` SIGINTs once the record of `step` is logged."""

    def __init__(self, step: int, times: int, *args):
        super().__init__(*args)
        self.step, self.times = step, times

    def log(self, record):
        super().log(record)
        if record["step"] == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)


def loss_window_by_window(model, tokens, block_size: int, n_predicted: int) -> tuple[float, int]:
    """What `gptzoo.evaluate` promises, computed plainly: windows of `block_size` tokens placed
    `n_predicted` apart (padded with token 0 at both ends), the last `n_predicted` output rows of
    each predicting the token after their position; float64 log-softmax, one window at a time.
    Returns (mean nats per token, tokens scored)."""
    forward = eqx.filter_jit(model)
    tokens = [int(t) for t in tokens]
    total, count = 0.0, 0
    for end in range(n_predicted, len(tokens) - 1 + n_predicted, n_predicted):
        window = [tokens[i] if 0 <= i < len(tokens) else 0 for i in range(end - block_size, end)]
        logits = np.asarray(forward(np.asarray(window, np.int32)), np.float64)[-n_predicted:]
        for row, position in enumerate(range(end - n_predicted, end)):
            if position + 1 < len(tokens):
                z = logits[row] - logits[row].max()
                total -= z[tokens[position + 1]] - np.log(np.exp(z).sum())
                count += 1
    return total / count, count


# Small random transformers models for the tests that import published weights (nothing is
# downloaded): a GPT-2 with its fused c_attn, and a LLaMA with grouped-query heads.
HF_CONFIGS = {
    "gpt2": dict(n_layer=2, n_embd=32, n_head=2, n_positions=64),
    "llama": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64),
}


def save_hf_model(architecture: str, folder: Path, seed: int = 0, **config):
    """A small random transformers `architecture` (HF_CONFIGS, updated by `config`) over the
    256 byte tokens, saved in `folder` with gptzoo's bytes tokenizer as its tokenizer.json."""
    import torch
    import transformers

    from gptzoo.data import ByteTokenizer

    cls = {"gpt2": transformers.GPT2Config, "llama": transformers.LlamaConfig}[architecture]
    hf_config = cls(vocab_size=256, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                    **{**HF_CONFIGS[architecture], **config})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    model.save_pretrained(folder)
    ByteTokenizer().to_hf().save(str(folder / "tokenizer.json"))
    return model
