"""The generic trainer: jitted steps, optimizer, sharding, checkpoints and progress."""

from gptzoo.trainer.checkpoint import load
from gptzoo.trainer.evaluate import EvalResult, evaluate, evaluate_run
from gptzoo.trainer.loop import TrainResult, train

__all__ = ["EvalResult", "TrainResult", "evaluate", "evaluate_run", "load", "train"]
