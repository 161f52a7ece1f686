"""Evaluation windows: every token of a split predicted once, read a batch at a time."""

from pathlib import Path

import numpy as np
from jaxtyping import Bool, Int

SHAKESPEARE = Path(__file__).with_name("tinyshakespeare.txt")


def n_windows(n_tokens: int, stride: int) -> int:
    return -(-(n_tokens - 1) // stride)


def eval_windows(tokens, block_size: int, stride: int, first: int, count: int
                 ) -> tuple[Int[np.ndarray, "count block"], Int[np.ndarray, "count block"],
                            Bool[np.ndarray, "count block"]]:
    """Windows `first .. first + count - 1` of `all_windows(tokens, block_size, stride)`, reading
    only the tokens they cover from `tokens` (an array or a memory-mapped `TokenSplit`); windows
    past the end are all padding, masked out."""
    context = block_size - stride
    lo = first * stride - context  # token index of the first window's first position
    hi = lo + (count - 1) * stride + block_size + 1
    padded = np.zeros(hi - lo, np.int32)
    present = tokens[max(lo, 0): min(hi, len(tokens))]
    padded[max(lo, 0) - lo: max(lo, 0) - lo + len(present)] = present
    index = stride * np.arange(count)[:, None] + np.arange(block_size)[None, :]
    mask = (np.arange(block_size) >= context) & (lo + index < len(tokens) - 1)
    return padded[index], padded[index + 1], mask


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
    return eval_windows(tokens, block_size, stride, 0, n_windows(len(tokens), stride))
