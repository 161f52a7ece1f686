"""The host's generation loop: tokens in, new tokens out, a chunk at a time."""

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from gptzoo.errors import GptzooError
from gptzoo.models.protocol import LanguageModel, can_decode, require
from gptzoo.sample.layout import extent, for_decoding, reads_by_extent
from gptzoo.sample.programs import CHUNK, decode_chunk, prefill, shift
from gptzoo.sample.settings import Sampling, check_context, check_sampling_args, default_context

BUCKET = 64  # prompts are padded to a multiple of this, so few prompt lengths compile


def generate_tokens(model: LanguageModel, prompts: list[np.ndarray], *, max_new_tokens: int,
                    temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, seeds: list[int] | None = None,
                    use_cache: bool = True, context: str | None = None,
                    keep: float = 0.5) -> Iterator[np.ndarray]:
    """Yield `(batch, k)` arrays of new tokens, at most `CHUNK` at a time, for prompts of any
    lengths; `context` and `keep` as in `gptzoo.sample`.

    Row i draws its randomness from `seeds[i]` alone, so a row equals generating it by itself.
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, context, keep)
    require(model, LanguageModel, "gptzoo sample")
    context = context or default_context(model, use_cache)
    prompts, use_cache = _checked_prompts(model, prompts, context, use_cache)
    if max_new_tokens == 0:
        return
    w, n_rows = model.block_size, len(prompts)
    n_keep = max(1, int(keep * w))
    # When the window will fill, each shift re-encodes n_keep tokens per row: a prompt padded to
    # that length shares the shifts' prefill program, one program fewer to compile or load.
    shifts = context == "shift" and max(map(len, prompts)) + max_new_tokens > w + 1
    padded, lengths, keys = prompt_batch(prompts, seeds, w, n_keep if shifts else None)
    model = for_decoding(model, len(padded))
    sampling = Sampling(float(temperature), top_k, top_p)
    state, vocab = prefill(model, padded, lengths, keys, np.int32(0), sampling, use_cache)
    yield np.asarray(state.token)[:n_rows, None]
    position, remaining = lengths.copy(), max_new_tokens - 1  # tracked on the host as well
    by_extent = reads_by_extent(model, state.cache)
    while remaining > 0:
        full = position >= w  # rows whose next token does not fit the window
        if context == "shift" and full.any():
            state = shift(model, state, position, n_keep, sampling, use_cache, vocab)
            position, remaining = np.where(full, n_keep, position + 1), remaining - 1
            yield np.asarray(state.token)[:n_rows, None]
            continue
        n, recompute = _chunk(context, use_cache, position, remaining, w)
        slots = extent(w, int(position.max()) + n) if by_extent else w
        state, tokens = decode_chunk(model, state, jnp.int32(n), sampling, recompute, vocab,
                                     slots)
        position, remaining = position + n, remaining - n
        yield np.asarray(tokens[:n_rows, :n])


def _checked_prompts(model: LanguageModel, prompts: list[np.ndarray], context: str,
                     use_cache: bool) -> tuple[list[np.ndarray], bool]:
    """The prompts as int32 arrays of at most `block_size` tokens (their last ones), and whether
    the model is decoded from its cache; refused when no prompt or an empty one is given."""
    check_context(model, context, use_cache)
    prompts = [np.asarray(p[-model.block_size:], dtype=np.int32) for p in prompts]
    if not prompts:
        raise GptzooError("no prompts to generate from; pass at least one")
    if any(len(p) == 0 for p in prompts):
        raise GptzooError("a prompt is empty after tokenizing; pass at least one character")
    return prompts, use_cache and can_decode(model)


def _chunk(context: str, use_cache: bool, position: np.ndarray, remaining: int,
           w: int) -> tuple[int, bool]:
    """How many tokens the next decode chunk generates, and whether it recomputes the context
    (without a cache, or cropping past the window) rather than reading the cache."""
    recompute = bool(not use_cache or (context == "crop" and (position >= w).any()))
    n = min(CHUNK, remaining)
    if context == "shift" or (context == "crop" and not recompute):
        n = min(n, w - int(position.max()))  # stop where the window fills
    return n, recompute


def prompt_batch(prompts: list[np.ndarray], seeds: list[int] | None, w: int,
                 shift_length: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The prompts right-padded to a multiple of `BUCKET` (or to `shift_length` when they fit
    it), each row's length, and each row's key. Batches are padded to a power of two (with
    copies of the first row), so that few shapes compile."""
    seeds = list(seeds or [0] * len(prompts))
    extra = (1 << (len(prompts) - 1).bit_length()) - len(prompts)
    prompts, seeds = prompts + prompts[:1] * extra, seeds + seeds[:1] * extra
    lengths = np.array([len(p) for p in prompts], dtype=np.int32)
    bucket = min(-(-lengths.max() // BUCKET) * BUCKET, w)
    if shift_length is not None and lengths.max() <= shift_length:
        bucket = shift_length
    padded = np.zeros((len(prompts), bucket), dtype=np.int32)
    for row, p in zip(padded, prompts, strict=True):
        row[: len(p)] = p
    return padded, lengths, np.stack([jax.random.PRNGKey(s) for s in seeds])
