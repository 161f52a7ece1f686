import math
from dataclasses import dataclass
from pathlib import Path

import jax
from jax.sharding import Mesh

from gptzoo.data import eval_windows, n_windows, prepare_corpus
from gptzoo.errors import GptzooError
from gptzoo.models.protocol import LanguageModel, require
from gptzoo.recipe import load_run_recipe
from gptzoo.trainer.run_dir import load
from gptzoo.trainer.sharding import batch_sharded, batch_shards, eval_mesh, shard
from gptzoo.trainer.step import masked_loss_sum


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy in nats per token
    n_tokens: int
    bytes_per_token: float | None = None  # UTF-8 bytes of the split's text per token

    @property
    def bits_per_token(self) -> float:
        return self.loss / math.log(2)

    @property
    def bits_per_byte(self) -> float | None:
        """Comparable across tokenizers; equals bits per token for an ASCII char model."""
        return None if self.bytes_per_token is None else self.bits_per_token / self.bytes_per_token


def evaluate(model: LanguageModel, tokens, block_size: int, batch_size: int = 64,
             bytes_per_token: float | None = None, mesh: Mesh | None = None) -> EvalResult:
    """Loss over a whole split (an array or a `TokenSplit`): every token after the first predicted
    exactly once, read `batch_size` windows at a time.

    With a `mesh` (and `model` placed on it, as the trainer does), each batch of windows is split
    over its `data` x `fsdp` devices, `batch_size` rounded up to a multiple of them, and the
    residual stream between blocks is constrained as in training.

    Windows step by the number of positions the model predicts (`n_predicted`), all of
    `block_size` for a GPT, the latents for Perceiver AR, so each token is predicted with up to
    `block_size` of context.
    """
    require(model, LanguageModel, "evaluate()")
    n_predicted = model.n_predicted(block_size)
    if mesh is not None:
        batch_size = -(-batch_size // batch_shards(mesh)) * batch_shards(mesh)
    total, n_tokens = 0.0, 0
    for first in range(0, n_windows(len(tokens), n_predicted), batch_size):
        # Whole batches keep one compiled shape; windows past the end are masked out.
        inputs, targets, mask = eval_windows(tokens, block_size, n_predicted, first, batch_size)
        if mesh is not None:
            inputs, targets, mask = jax.device_put((inputs, targets, mask), batch_sharded(mesh))
        total += float(masked_loss_sum(model, inputs, targets, mask, mesh))
        n_tokens += int(mask.sum())
    return EvalResult(loss=total / n_tokens, n_tokens=n_tokens, bytes_per_token=bytes_per_token)


def evaluate_run(run_dir: str | Path, data_path: str | Path | None = None) -> EvalResult:
    """Evaluate a run's latest checkpoint on the validation split of the data it was trained on
    (or of `data_path`)."""
    model, tokenizer = load(run_dir)
    recipe = load_run_recipe(Path(run_dir))
    mesh = eval_mesh(recipe.mesh)
    model = shard(model, mesh)
    if data_path is not None:
        recipe.set("data.path", str(data_path))
    try:
        val = prepare_corpus(recipe.data, tokenizer).val
    except GptzooError as e:
        if data_path is None:
            raise
        # The data came from --data, not the recipe's data.path: the message says so.
        raise GptzooError(str(e).replace("set data.path to", "pass --data").replace(
            "data.path=", "--data=")) from e
    val.require(recipe.model.block_size + 1, "one window (model.block_size + 1)")
    return evaluate(model, val, recipe.model.block_size, bytes_per_token=val.bytes_per_token,
                    mesh=mesh)
