import math
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from gptzoo.data import all_windows, read_text, split
from gptzoo.recipe import load_run_recipe
from gptzoo.trainer.checkpoint import load
from gptzoo.trainer.step import masked_loss_sum


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy in nats per token
    n_tokens: int

    @property
    def bits_per_token(self) -> float:
        return self.loss / math.log(2)


def evaluate(model, tokens: np.ndarray, block_size: int, batch_size: int = 64) -> EvalResult:
    """Loss over a whole split: every token after the first predicted exactly once.

    Windows step by the number of positions the model predicts, all of `block_size` for a GPT,
    the latents for Perceiver AR, so each token is predicted with up to `block_size` of context.
    """
    n_predicted = eqx.filter_eval_shape(model, jnp.zeros((1, block_size), jnp.int32)).shape[-2]
    inputs, targets, mask = all_windows(tokens, block_size, stride=n_predicted)
    pad = -len(inputs) % batch_size
    # Padding to whole batches keeps one compiled shape; padded windows are masked out.
    inputs, targets, mask = (np.concatenate([a, np.zeros((pad, block_size), a.dtype)])
                             for a in (inputs, targets, mask))
    total = sum(
        float(masked_loss_sum(model, inputs[i:i + batch_size], targets[i:i + batch_size],
                              mask[i:i + batch_size]))
        for i in range(0, len(inputs), batch_size)
    )
    n_tokens = int(mask.sum())
    return EvalResult(loss=total / n_tokens, n_tokens=n_tokens)


def evaluate_run(run_dir: str | Path, data_path: str | Path | None = None) -> EvalResult:
    """Evaluate a run's latest checkpoint on the validation split of the data it was trained on
    (or of `data_path`)."""
    model, tokenizer = load(run_dir)
    recipe = load_run_recipe(Path(run_dir))
    text = read_text(data_path or recipe.data.path)
    _, val = split(tokenizer.encode(text), recipe.data.val_fraction, recipe.model.block_size)
    return evaluate(model, val, recipe.model.block_size)
