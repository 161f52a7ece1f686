"""The generic trainer: jitted steps, optimizer, sharding, checkpoints and progress."""

from typing import TYPE_CHECKING

from gptzoo._lazy import lazy_attributes
from gptzoo.trainer.run_dir import load

# The training loop (and its progress display, metrics sinks and optimizer set-up) and the
# evaluation (which imports the loss, and with it optax) are imported on first use, so that
# loading a run to sample from it imports neither.
_LAZY = {"TrainResult": "gptzoo.trainer.loop", "train": "gptzoo.trainer.loop",
         "EvalResult": "gptzoo.trainer.evaluate", "evaluate": "gptzoo.trainer.evaluate",
         "evaluate_run": "gptzoo.trainer.evaluate"}
__all__ = ["EvalResult", "TrainResult", "evaluate", "evaluate_run", "load", "train"]

if TYPE_CHECKING:
    from gptzoo.trainer.evaluate import EvalResult, evaluate, evaluate_run
    from gptzoo.trainer.loop import TrainResult, train


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
