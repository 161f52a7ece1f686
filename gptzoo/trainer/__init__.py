"""The generic trainer: jitted steps, optimizer, sharding, checkpoints and progress."""

from typing import TYPE_CHECKING

from gptzoo._lazy import lazy_attributes
from gptzoo.trainer.checkpoint import load
from gptzoo.trainer.evaluate import EvalResult, evaluate, evaluate_run

# The training loop (and its progress display, metrics sinks and optimizer set-up) is imported
# on first use, so that loading a run to sample from it does not import it.
_LAZY = {"TrainResult": "gptzoo.trainer.loop", "train": "gptzoo.trainer.loop"}
__all__ = ["EvalResult", "TrainResult", "evaluate", "evaluate_run", "load", "train"]

if TYPE_CHECKING:
    from gptzoo.trainer.loop import TrainResult, train


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
