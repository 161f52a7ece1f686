"""Text generation: prefill the prompt in one pass, then a compiled decode loop over a KV cache.

A model opts into the cache with `cacheable = True` and, per example,
  `init_cache() -> cache` (a PyTree preallocated to `block_size` positions),
  `decode(tokens[seq], positions[seq], cache) -> (logits[seq, vocab], cache)`, and
  `slides_window: bool` (True: past `block_size` the oldest positions drop out of the cache, as
  rotary/ALiBi attention allows; False: learned positions, so past `block_size` the context is
  cropped to the last `block_size` tokens and recomputed each step, as nanoGPT does).
Any other model (a user's component, say) is sampled by recomputing the cropped context each step.
"""

from collections.abc import Iterator

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from gptzoo.data import Tokenizer
from gptzoo.errors import GptzooError

CHUNK = 16  # tokens per compiled decode call; the host streams text between calls
BUCKET = 64  # prompts are padded to a multiple of this, so few prompt lengths compile


def sample_logits(logits: Float[Array, " vocab"], key: PRNGKeyArray, temperature: float,
                  top_k: int | None = None, top_p: float | None = None) -> Int[Array, ""]:
    """Greedy when `temperature == 0`; else softmax(logits / T) restricted to the `top_k` most
    likely tokens and to the smallest set whose probability reaches `top_p` (nucleus)."""
    if temperature == 0:
        return jnp.argmax(logits)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        logits = jnp.where(logits < jax.lax.top_k(logits, top_k)[0][-1], -jnp.inf, logits)
    if top_p is not None and top_p < 1:
        order = jnp.argsort(-logits)
        probs = jax.nn.softmax(logits[order])
        # Keep a token if the tokens ranked above it hold less than top_p: the smallest nucleus.
        keep_sorted = jnp.cumsum(probs) - probs < top_p
        keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits)


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None = None,
                        top_p: float | None = None) -> None:
    if max_new_tokens < 0:
        raise GptzooError(f"--max-new-tokens={max_new_tokens} is negative; pass 0 or more")
    if temperature < 0:
        raise GptzooError(f"--temperature={temperature} is negative; pass 0 (greedy) or more")
    if top_k is not None and top_k < 1:
        raise GptzooError(f"--top-k={top_k} must be at least 1; omit it to sample from all tokens")
    if top_p is not None and not 0 < top_p <= 1:
        raise GptzooError(f"--top-p={top_p} must be in (0, 1]; omit it to sample from all tokens")


def has_cache(model) -> bool:
    return getattr(model, "cacheable", False)


def _last_window_logits(model, history: Int[Array, " n"], position: Int[Array, ""]):
    """Next-token logits after `history[position]`, from a full forward over the (cropped) context.

    The window is padded on the right; causality hides the padding from the position we read.
    """
    block_size = model.block_size
    # Models may predict only the window's last n positions (Perceiver AR), which must include
    # `position`: a shorter history starts the window before it, left-padded with token 0.
    n = eqx.filter_eval_shape(model, history[:block_size]).shape[-2]
    start = jnp.minimum(jnp.maximum(position + 1 - block_size, 0), position + n - block_size)
    history = jnp.pad(history, (block_size - n, 0))
    window = jax.lax.dynamic_slice(history, (start + block_size - n,), (block_size,))
    return model(window)[position - start - (block_size - n)]


@eqx.filter_jit
def _prefill(model, history: Int[Array, "batch n"], lengths: Int[Array, " batch"], bucket: int,
             use_cache: bool):
    """The prompts (`history[:, :bucket]`, right-padded) in one forward pass."""
    if not use_cache:
        return None, jax.vmap(lambda h, n: _last_window_logits(model, h, n - 1))(history, lengths)

    def one(tokens, length):
        logits, cache = model.decode(tokens, jnp.arange(bucket), model.init_cache())
        return cache, logits[length - 1]

    return jax.vmap(one)(history[:, :bucket], lengths)


@eqx.filter_jit(donate="all-except-first")
def _decode_chunk(model, state, n_steps: int, temperature: float, top_k: int | None,
                  top_p: float | None, use_cache: bool):
    """`n_steps` tokens for every row: sample from the current logits, then advance by one."""

    def step(state, _):
        cache, logits, positions, history, keys, t = state
        tokens = jax.vmap(lambda lg, k: sample_logits(lg, jax.random.fold_in(k, t), temperature,
                                                      top_k, top_p))(logits, keys)
        history = jax.vmap(lambda h, p, tok: h.at[p].set(tok))(history, positions, tokens)

        def recompute(cache):
            window_logits = jax.vmap(lambda h, p: _last_window_logits(model, h, p))
            return cache, window_logits(history, positions)

        def cached(cache):
            def one(c, tok, p):
                logits, c = model.decode(tok[None], p[None], c)
                return c, logits[0]
            return jax.vmap(one)(cache, tokens, positions)

        if not use_cache:
            cache, logits = recompute(cache)
        elif model.slides_window:
            cache, logits = cached(cache)
        else:
            full = jnp.any(positions >= model.block_size)
            cache, logits = jax.lax.cond(full, recompute, cached, cache)
        return (cache, logits, positions + 1, history, keys, t + 1), tokens

    state, tokens = jax.lax.scan(step, state, None, length=n_steps)
    return state, tokens.T


def generate_tokens(model, prompts: list[np.ndarray], *, max_new_tokens: int,
                    temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, seeds: list[int] | None = None,
                    use_cache: bool = True) -> Iterator[np.ndarray]:
    """Yield `(batch, k)` arrays of new tokens, `CHUNK` steps at a time, for prompts of any lengths.

    Row i draws its randomness from `seeds[i]` alone, so a row equals generating it by itself.
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    use_cache = use_cache and has_cache(model)
    block_size = model.block_size
    prompts = [np.asarray(p[-block_size:], dtype=np.int32) for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise GptzooError("a prompt is empty after tokenizing; pass at least one character")
    lengths = np.array([len(p) for p in prompts], dtype=np.int32)
    bucket = min(-(-lengths.max() // BUCKET) * BUCKET, block_size)
    n_chunks = -(-max_new_tokens // CHUNK)
    # Room for the prompt, every generated token and a full window past the last one.
    history = np.zeros((len(prompts), bucket + n_chunks * CHUNK + block_size), dtype=np.int32)
    for row, p in zip(history, prompts):
        row[: len(p)] = p
    cache, logits = _prefill(model, jnp.asarray(history), jnp.asarray(lengths), int(bucket),
                             use_cache)
    keys = jnp.stack([jax.random.PRNGKey(s) for s in (seeds or [0] * len(prompts))])
    state = (cache, logits, jnp.asarray(lengths), jnp.asarray(history), keys, jnp.int32(0))
    remaining = max_new_tokens
    while remaining > 0:
        state, tokens = _decode_chunk(model, state, CHUNK, float(temperature), top_k, top_p,
                                      use_cache)
        yield np.asarray(tokens[:, :remaining])
        remaining -= CHUNK


def _encode_prompt(tokenizer: Tokenizer, prompt: str) -> np.ndarray:
    # An empty prompt starts from the tokenizer's choice: a newline, or end-of-text for BPE.
    return tokenizer.encode(prompt) if prompt else tokenizer.start_tokens()


def stream_batch(model, tokenizer: Tokenizer, prompts: list[str], *,
                 max_new_tokens: int = 500, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seeds: list[int] | None = None,
                 stop: str | None = None, use_cache: bool = True) -> Iterator[list[str]]:
    """Yield, for each prompt, the next piece of its continuation; after `stop` a row yields ''."""
    texts = ["" for _ in prompts]
    for tokens in generate_tokens(model, [_encode_prompt(tokenizer, p) for p in prompts],
                                  max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seeds=seeds, use_cache=use_cache):
        pieces = [_until_stop(t, tokenizer.decode(row), stop) for t, row in zip(texts, tokens)]
        texts = [t + p for t, p in zip(texts, pieces)]
        yield pieces
        if stop is not None and all(stop in t for t in texts):
            return


def _until_stop(text: str, piece: str, stop: str | None) -> str:
    """`piece` cut just after the first `stop` in `text + piece` ('' once `text` holds it)."""
    if stop is None or stop not in text + piece:
        return piece
    return (text + piece)[: (text + piece).index(stop) + len(stop)][len(text):]


def stream(model, tokenizer: Tokenizer, prompt: str = "", *, seed: int = 0,
           **kwargs) -> Iterator[str]:
    """Yield the continuation of one prompt piece by piece (the prompt is not repeated).

    Keyword arguments as `generate`.
    """
    for pieces in stream_batch(model, tokenizer, [prompt], seeds=[seed], **kwargs):
        yield pieces[0]


def generate(model, tokenizer: Tokenizer, prompt: str | list[str] = "", *, seed: int = 0,
             **kwargs) -> str | list[str]:
    """Each prompt followed by its continuation.

    Options: `max_new_tokens` (500), `temperature` (1.0; 0 is greedy), `top_k`, `top_p`,
    `stop` (a string that ends a row's text), `use_cache` (True). Every row uses `seed`.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    texts = list(prompts)
    for pieces in stream_batch(model, tokenizer, prompts, seeds=[seed] * len(prompts), **kwargs):
        texts = [t + p for t, p in zip(texts, pieces)]
    return texts[0] if isinstance(prompt, str) else texts
