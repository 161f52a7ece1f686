"""The `gptzoo` command: train, prepare, sample, serve, eval, tune-batch, import-hf, export-hf,
keys, plot, runs. Each command imports what it needs when it runs, so `gptzoo sample` starts
without the training loop."""

from gptzoo.cli import training, using  # noqa: F401 - each registers its commands on `main`
from gptzoo.cli.app import entry, main

__all__ = ["entry", "main"]
