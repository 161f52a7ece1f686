"""A run directory from outside the training loop: its model and tokenizer loaded for sampling,
evaluation and export, and the check that a new run can write it."""

import contextlib
import fcntl
import os
import shutil
import socket
from contextlib import closing
from pathlib import Path

import equinox as eqx
import jax

from gptzoo.errors import GptzooError
from gptzoo.trainer.checkpoint import Checkpoints


def load(run_dir: str | Path, merge: bool = True):
    """The model and tokenizer of a run directory's newest readable checkpoint (no training
    state); an unreadable newer one is skipped with a warning. A LoRA run's model is its base
    run's with the adapters merged into the weights, or, with `merge=False`, kept apart."""
    from gptzoo.data import tokenizer_from_dict
    from gptzoo.lora.run import BASE_KEY, load_adapted
    from gptzoo.recipe import load_run_recipe

    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise GptzooError(f"{run_dir} is a file, not a run directory; pass the --run-dir of a "
                          "`gptzoo train` run, e.g. runs/char_shakespeare")
    if not run_dir.is_dir():
        raise GptzooError(f"run directory {run_dir} does not exist; pass the --run-dir of a "
                          "`gptzoo train` run, e.g. runs/char_shakespeare")
    if run_dir.parent.name == "checkpoints" and run_dir.name.isdigit():
        raise GptzooError(f"{run_dir} is one checkpoint of a run; pass the run directory, "
                          f"{run_dir.parent.parent} (its newest readable checkpoint is read)")
    if not (run_dir / "checkpoints").is_dir():
        raise GptzooError(f"{run_dir} holds no checkpoints; train it first with gptzoo train")
    recipe = load_run_recipe(run_dir)

    def restore(step: int):
        meta = checkpoints.meta(step)
        tokenizer = tokenizer_from_dict(meta["tokenizer"])
        if BASE_KEY in meta:  # a LoRA run
            return load_adapted(run_dir, recipe, checkpoints, step, meta, tokenizer.vocab_size,
                                merge), tokenizer
        template = eqx.filter_eval_shape(recipe.build, tokenizer.vocab_size,
                                         key=jax.random.PRNGKey(0))
        return checkpoints.restore(step, template), tokenizer

    with closing(Checkpoints(run_dir)) as checkpoints:
        found = checkpoints.restore_newest(restore)
    if found is None:
        raise GptzooError(f"{run_dir} holds no checkpoints; train it first with gptzoo train")
    return found[1]


def ensure_writable(run_dir: Path) -> None:
    """Fail before any training when `run_dir` cannot be created or written."""
    # Named for its process: the processes of a multi-host run probe one folder at once.
    probe = run_dir / f".gptzoo-write-test-{socket.gethostname()}-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as e:
        raise GptzooError(f"cannot write the run directory {run_dir} ({e.strerror}: "
                          f"{e.filename}); pass --run-dir a writable folder with free space") from e


@contextlib.contextmanager
def training_lock(run_dir: Path):
    """Hold `run_dir/.lock` while a training writes the folder: a second `gptzoo train` into it
    (whose checkpoints and metrics would interleave with the first's) is refused in one line."""
    with open(run_dir / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise GptzooError(f"{run_dir} is being trained by {holder}; wait for it to end, or "
                              "pass another --run-dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"gptzoo train (pid {os.getpid()} on {socket.gethostname()})")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def remove_if_unused(run_dir: Path) -> None:
    """Remove `run_dir` if it holds nothing but the training lock and empty folders: a run that
    failed before it wrote anything."""
    if run_dir.is_dir() and all(p.name == ".lock" or (p.is_dir() and not any(p.iterdir()))
                                for p in run_dir.iterdir()):
        shutil.rmtree(run_dir)
