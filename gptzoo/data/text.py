from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int, PRNGKeyArray

from gptzoo.errors import GptzooError

SHAKESPEARE = Path(__file__).with_name("tinyshakespeare.txt")


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise GptzooError(f"data file {path} does not exist; set data.path to a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GptzooError(f"data file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not text:
        raise GptzooError(f"data file {path} is empty; set data.path to a file with text in it")
    return text


def split(tokens: np.ndarray, val_fraction: float, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """First (1 - val_fraction) of the tokens for training, the rest for validation."""
    n_train = int(len(tokens) * (1 - val_fraction))
    train, val = tokens[:n_train], tokens[n_train:]
    for name, part in (("training", train), ("validation", val)):
        if len(part) < block_size + 1:
            raise GptzooError(
                f"the {name} split has {len(part)} tokens, fewer than block_size + 1 = "
                f"{block_size + 1}; use a longer data file or a smaller model.block_size"
            )
    return train, val


def random_windows(
    tokens: Int[Array, " n"], key: PRNGKeyArray, batch_size: int, block_size: int
) -> tuple[Int[Array, "batch block"], Int[Array, "batch block"]]:
    """Inputs and next-token targets for `batch_size` windows at random offsets (on device)."""
    starts = jax.random.randint(key, (batch_size,), 0, tokens.shape[0] - block_size)
    idx = starts[:, None] + jnp.arange(block_size + 1)[None, :]
    windows = tokens[idx]
    return windows[:, :-1], windows[:, 1:]


def all_windows(
    tokens: np.ndarray, block_size: int, stride: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows `stride` apart (default `block_size`: non-overlapping) whose last `stride` positions
    predict every token after the first exactly once.

    The positions before those are context only: the first window starts `block_size - stride`
    tokens before the text, left-padded with token 0. Returns inputs, targets and a mask of the
    positions to score (the last window is padded to full length).
    """
    stride = block_size if stride is None else stride
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride={stride} must lie in [1, block_size={block_size}]; pass the "
                         "number of positions the model predicts per window")
    context = block_size - stride
    n_windows = -(-(len(tokens) - 1) // stride)
    padded = np.zeros(context + n_windows * stride + 1, dtype=tokens.dtype)
    padded[context: context + len(tokens)] = tokens
    index = stride * np.arange(n_windows)[:, None] + np.arange(block_size)[None, :]
    mask = (np.arange(block_size) >= context) & (index - context < len(tokens) - 1)
    return padded[index], padded[index + 1], mask
