"""The generic trainer: jitted steps, optimizer, sharding, checkpoints and progress."""

import importlib
from typing import TYPE_CHECKING

from gptzoo.trainer.checkpoint import load
from gptzoo.trainer.evaluate import EvalResult, evaluate, evaluate_run

# The training loop (and its progress display, metrics sinks and optimizer set-up) is imported
# on first use, so that loading a run to sample from it does not import it.
_LAZY = {"TrainResult": "gptzoo.trainer.loop", "train": "gptzoo.trainer.loop"}
__all__ = ["EvalResult", "TrainResult", "evaluate", "evaluate_run", "load", "train"]

if TYPE_CHECKING:
    from gptzoo.trainer.loop import TrainResult, train


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'gptzoo.trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
