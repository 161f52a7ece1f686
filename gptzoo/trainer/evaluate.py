import math
from dataclasses import dataclass

import numpy as np

from gptzoo.data import all_windows
from gptzoo.trainer.step import masked_loss_sum


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy in nats per token
    n_tokens: int

    @property
    def bits_per_token(self) -> float:
        return self.loss / math.log(2)


def evaluate(model, tokens: np.ndarray, block_size: int, batch_size: int = 64) -> EvalResult:
    """Loss over a whole split: every token after the first predicted exactly once."""
    inputs, targets, mask = all_windows(tokens, block_size)
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
