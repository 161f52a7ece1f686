"""Text generation: prefill the prompt in one pass, then a compiled decode loop over a KV cache.

A model is a `LanguageModel` (`gptzoo.models.protocol`). One that is also a `CachedDecoder`
whose parts allow it (`cacheable`) is decoded from its KV cache; any other (Perceiver AR, a
model with a spatial gating unit) is sampled by recomputing its context every token.

What the context is once it holds `block_size` tokens (`context`):
  "shift": keep its last `keep` fraction, re-encode those tokens at positions 0.. in one prefill
     and continue from the cache (llama.cpp's context shift): the cost per token stays flat;
  "crop": the last `block_size` tokens, recomputed every token (nanoGPT's `generate`);
  "slide": the cache keeps the last `block_size` positions of every layer (rotary/ALiBi only);
     exact for a model with a sliding window, whose rolling cache holds the window.
None (the default) is "slide" for a sliding-window model decoded from its cache, else "shift".
"""

import weakref
from collections.abc import Iterator
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from gptzoo.data import Tokenizer
from gptzoo.errors import GptzooError
from gptzoo.models.protocol import CachedDecoder, LanguageModel, can_decode, require
from gptzoo.nn import Stack, rowwise_layout, unstacked
from gptzoo.nn.kv_cache import KVCache
from gptzoo.nn.rowwise import MIN_ROWS
from gptzoo.stored_jit import stored_jit

CHUNK = 16  # most tokens per compiled decode call; the host streams text between calls
BUCKET = 64  # prompts are padded to a multiple of this, so few prompt lengths compile
MIN_EXTENT = 64  # fewest KV cache slots a decode chunk reads (see _extent)
CONTEXTS = ("shift", "crop", "slide")


def sample_logits(logits: Float[Array, " vocab"], key: PRNGKeyArray, temperature: float,
                  top_k: int | None = None, top_p: float | None = None) -> Int[Array, ""]:
    """Greedy when `temperature == 0`; else softmax(logits / T) restricted to the `top_k` most
    likely tokens and to the smallest set whose probability reaches `top_p` (nucleus)."""
    noise = None if temperature == 0 else jax.random.gumbel(key, logits.shape, logits.dtype)
    return pick_token(logits, noise, temperature, top_k, top_p)


def pick_token(logits: Float[Array, " vocab"], noise: Float[Array, " vocab"] | None,
               temperature: float, top_k: int | None = None,
               top_p: float | None = None) -> Int[Array, ""]:
    """`sample_logits` given its Gumbel `noise` (`jax.random.categorical`'s own method: the
    argmax of logits plus noise), so the noise can be drawn ahead of the decode loop."""
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
    return jnp.argmax(logits + noise)


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None = None,
                        top_p: float | None = None, context: str | None = None,
                        keep: float = 0.5) -> None:
    if max_new_tokens < 0:
        raise GptzooError(f"--max-new-tokens={max_new_tokens} is negative; pass 0 or more")
    if temperature < 0:
        raise GptzooError(f"--temperature={temperature} is negative; pass 0 (greedy) or more")
    if top_k is not None and top_k < 1:
        raise GptzooError(f"--top-k={top_k} must be at least 1; omit it to sample from all tokens")
    if top_p is not None and not 0 < top_p <= 1:
        raise GptzooError(f"--top-p={top_p} must be in (0, 1]; omit it to sample from all tokens")
    if context not in (None, *CONTEXTS):
        raise GptzooError(f"--context={context} is not one of {', '.join(CONTEXTS)}")
    if not 0 < keep <= 1:
        raise GptzooError(f"--keep={keep} must be in (0, 1]: the fraction of the window kept "
                          "when it is full")


def default_context(model: LanguageModel, use_cache: bool = True) -> str:
    """The context mode when none is asked for: "slide" for a model whose attention window is
    narrower than `block_size` (Mistral's sliding window), decoded from its cache, since its
    rolling cache holds the window and sliding decodes what its forward computes over the whole
    history; "shift" for any other."""
    cached = use_cache and can_decode(model) and model.slides_window
    return "slide" if cached and model.context_window < model.block_size else "shift"


def check_context(model: LanguageModel, context: str | None, use_cache: bool = True) -> None:
    """`context="slide"` needs the cache of a model whose attention carries the positions."""
    if context != "slide":
        return
    if use_cache:
        require(model, CachedDecoder, "--context slide", "use --context shift or crop")
    cached = use_cache and model.cacheable
    if cached and model.slides_window:
        return
    why = "has learned positions, which end at block_size" if cached else (
        "is sampled without a KV cache")
    raise GptzooError(f"--context slide needs a cached model with rotary or ALiBi positions; "
                      f"this one {why}: use --context shift or crop")


class State(NamedTuple):
    """Every row's generation so far; `token` is sampled (and emitted) but not yet fed."""

    cache: object  # the model's cache with a leading batch axis; None when recomputing
    token: Int[Array, " batch"]
    position: Int[Array, " batch"]  # the position `token` is fed at
    ring: Int[Array, "batch block_size"]  # the token at position p in slot p % block_size
    keys: PRNGKeyArray
    t: Int[Array, ""]  # index of the next token to sample, for each row's key


def _window(ring: Int[Array, " w"], position: Int[Array, ""]) -> Int[Array, " w"]:
    """The last `w` tokens up to `position` in order, or tokens 0..position right-padded."""
    w = ring.shape[0]
    return jnp.where(position < w, ring, ring[(position + 1 + jnp.arange(w)) % w])


def _window_logits(model: LanguageModel, window: Int[Array, " w"], index: Int[Array, ""]):
    """Next-token logits after `window[index]`, from a full forward over the window.

    Causality hides the right padding from the position we read. Models may predict only the
    window's last n positions (Perceiver AR: `n_predicted`), which must include `index`: a
    shorter context starts the window before it, left-padded with token 0.
    """
    w = window.shape[0]
    n = model.n_predicted(w)
    start = jnp.minimum(0, index + n - w)
    window = jax.lax.dynamic_slice(jnp.pad(window, (w - n, 0)), (start + w - n,), (w,))
    return model(window)[index - start - (w - n)]


def _noise(keys: PRNGKeyArray, t: Int[Array, ""], n: int, vocab: int, temperature: float):
    """The Gumbel noise of each row's next `n` draws, `(batch, n, vocab)` (None when greedy):
    draw t of row i comes from `fold_in(keys[i], t)` alone."""
    if temperature == 0:
        return None
    def row(key):
        return jax.vmap(lambda i: jax.random.gumbel(jax.random.fold_in(key, i), (vocab,)))(
            t + jnp.arange(n))
    return jax.vmap(row)(keys)


def _emit(state: State, logits, sampling, noise=None) -> State:
    """Sample each row's next token from `logits` (with this draw's `noise`, `(batch, vocab)`,
    if drawn ahead) and make it the token to feed."""
    if noise is None:
        drawn = _noise(state.keys, state.t, 1, logits.shape[-1], sampling[0])
        noise = None if drawn is None else drawn[:, 0]
    token = jax.vmap(lambda lg, z: pick_token(lg, z, *sampling))(logits, noise)
    position = state.position + 1
    ring = jax.vmap(lambda r, p, tok: r.at[p % r.shape[0]].set(tok))(state.ring, position, token)
    return State(state.cache, token, position, ring, state.keys, state.t + 1)


def _prefill_cache(model: CachedDecoder, tokens: Int[Array, "batch n"], last: Int[Array, " batch"]):
    """A fresh cache per row holding `tokens` up to `last` at positions 0.., and the logits at
    `last`. The padding after `last` goes in at position -1, which the cache neither keeps nor
    shows: a rolling cache smaller than the prompt's bucket keeps the prompt's last tokens."""
    def one(tokens, last):
        index = jnp.arange(tokens.shape[0])
        logits, cache = model.decode(tokens, jnp.where(index <= last, index, -1),
                                     model.init_cache())
        return cache, logits[last]
    return jax.vmap(one)(tokens, last)


@stored_jit
def _prefill(model, prompts: Int[Array, "batch bucket"], lengths: Int[Array, " batch"], keys,
             t: Int[Array, ""], sampling: tuple, use_cache: bool) -> tuple[State, int]:
    """The prompts (right-padded) in one forward pass, each row's first new token (its draw `t`),
    and the size of the vocabulary (static: the decode chunk draws its noise before tracing the
    model). Also a context shift's re-encoding, when every row shifts at once."""
    w = model.block_size
    ring = jnp.pad(prompts, ((0, 0), (0, w - prompts.shape[1])))
    if use_cache:
        cache, logits = _prefill_cache(model, prompts, lengths - 1)
    else:
        cache, logits = None, jax.vmap(lambda r, n: _window_logits(model, r, n))(ring, lengths - 1)
    state = _emit(State(cache, lengths * 0, lengths - 1, ring, keys, t), logits, sampling)
    return state, logits.shape[-1]


def _step(model: LanguageModel, state: State, sampling: tuple, recompute: bool,
          noise=None) -> State:
    """Feed every row's token and sample the next one."""
    if recompute:
        logits = jax.vmap(lambda r, p: _window_logits(model, _window(r, p), jnp.minimum(
            p, r.shape[0] - 1)))(state.ring, state.position)
        return _emit(state, logits, sampling, noise)
    logits, cache = jax.vmap(model.decode)(state.token[:, None], state.position[:, None],
                                           state.cache)
    return _emit(state._replace(cache=cache), logits[:, 0], sampling, noise)


def _is_kv_cache(x) -> bool:
    return isinstance(x, KVCache)


def _extent(size: int, end: int) -> int:
    """How many cache slots a decode chunk reads when the positions it feeds end before `end`:
    the smallest of `size`, `size/2`, `size/4`, ... (at least `MIN_EXTENT`) that holds them.
    Each extent is its own program, so a generation compiles at most a few. Reading the whole
    cache instead, GPT-2 small at batch 8 decoded its first 48 tokens about a quarter slower;
    halving rather than quartering, the 6-layer char model's 200 tokens at batch 8 went 7% faster
    (median of 8 runs alternating in one process, 756 -> 810 tokens/s, 2-core CPU)."""
    extent = size
    while extent // 2 >= max(end, MIN_EXTENT):
        extent //= 2
    return extent


def _reads_by_extent(model, cache) -> bool:
    """Whether decode chunks read only the cache slots they need (`_extent`). Each extent is
    another program to compile, which pays where the batch's cache is at least an eighth of the
    weights' bytes: not for the 6-layer char model at batch 1 (a ninth), for GPT-2 small (about
    a seventh at batch 1)."""
    def nbytes(tree) -> int:
        return sum(a.nbytes for a in jax.tree.leaves(eqx.filter(tree, eqx.is_array)))
    return cache is not None and 8 * nbytes(cache) >= nbytes(model)


@stored_jit(donate="all-except-first")
def _decode_chunk(model, state: State, n_steps: Int[Array, ""], sampling: tuple,
                  recompute: bool, vocab: int, extent: int
                  ) -> tuple[State, Int[Array, "batch chunk"]]:
    """`n_steps <= CHUNK` tokens for every row (a traced count: one compilation serves all),
    reading the first `extent` slots of each layer's KV cache (`_extent`).

    The chunk's random draws are made before its loop: drawn inside it, the PRNG's small
    operations ran at every token. The cache's first slots are copied out before the loop and
    back after it, once per chunk.
    """
    noise = _noise(state.keys, state.t, CHUNK, vocab, sampling[0])
    whole, sliced = state.cache, not recompute and extent < model.block_size
    if sliced:
        state = state._replace(cache=jax.tree.map(lambda c: c.prefix(extent), whole,
                                                  is_leaf=_is_kv_cache))

    def body(i, carry):
        state, out = carry
        state = _step(model, state, sampling, recompute, None if noise is None else noise[:, i])
        return state, out.at[:, i].set(state.token)

    out = jnp.zeros((state.token.shape[0], CHUNK), jnp.int32)
    state, out = jax.lax.fori_loop(0, n_steps, body, (state, out))
    if sliced:
        state = state._replace(cache=jax.tree.map(lambda c, p: c.with_prefix(p), whole,
                                                  state.cache, is_leaf=_is_kv_cache))
    return state, out


@stored_jit(donate="all-except-first")
def _shift(model, state: State, full: Array, keep: int, sampling: tuple) -> State:
    """One token for every row; a `full` row first keeps its last `keep` tokens (the one to feed
    included) at positions 0..keep-1 and, with a cache, re-encodes them in one prefill."""
    w = model.block_size
    kept = jax.vmap(lambda r, p: r[(p - keep + 1 + jnp.arange(keep)) % w])(state.ring,
                                                                          state.position)
    ring = jnp.where(full[:, None], jnp.pad(kept, ((0, 0), (0, w - keep))), state.ring)
    shifted = state._replace(ring=ring, position=jnp.where(full, keep - 1, state.position))
    if state.cache is None:
        return _step(model, shifted, sampling, recompute=True)
    cache, logits = _prefill_cache(model, kept, jnp.full(full.shape, keep - 1))
    on = _step(model, state, sampling, recompute=False)  # rows that are not full decode as usual
    off = _emit(shifted._replace(cache=cache), logits, sampling)
    return jax.tree.map(
        lambda a, b: a if a.ndim == 0 else jnp.where(full.reshape(-1, *[1] * (a.ndim - 1)), a, b),
        off, on)


@stored_jit
def _decoding_form(model, unstack: bool, rows_first: bool):
    """The model as the decode loop reads it, built in one program (slicing the layers out op by
    op took 0.23 s at start-up, 6-layer model): its blocks written out (`unstack`) and, for
    batches of `MIN_ROWS` rows or more on CPU, its weights in `rowwise_layout` (`rows_first`)."""
    model = unstacked(model) if unstack else model
    return rowwise_layout(model) if rows_first else model


# The last model converted by `_for_decoding`: [(weak reference to it, (unstack, rows_first),
# form)]. One entry, dropped when its model is garbage-collected (the reference's callback; a
# replaced reference never calls back): a loop of `generate` calls on one model converts it once
# (GPT-2 small's 500 MB of weights: 0.18-0.25 s per call written out, 0.39-0.41 s with the
# rowwise copy), at the price of keeping one converted copy while the model lives.
_last_form: list[tuple] = []


def _for_decoding(model, n_rows: int):
    """`_decoding_form` of `model` for a batch of `n_rows`, or the model itself when that form
    changes nothing (a program would still copy every weight); the last model's form is reused
    (`_last_form`)."""
    # Decoding scanned blocks writes every layer's whole cache out of the scan at every token;
    # written out, each block updates its cache in place: 111 -> 144 tokens/s at batch 1 and
    # 151 -> 391 at batch 8 (6 x 384 char model, 2-core CPU). The price: the stacked weights copied
    # into per-layer arrays while generating.
    def is_stack(x) -> bool:
        return isinstance(x, Stack)

    unstack = any(map(is_stack, jax.tree.leaves(model, is_leaf=is_stack)))
    # gptzoo/nn/rowwise.py: batch-8 tokens/s 1.1-1.3x (6-layer char), 1.3-1.5x (GPT-2 small),
    # for a copy of the weights.
    rows_first = n_rows >= MIN_ROWS and jax.default_backend() == "cpu"
    if not (unstack or rows_first):
        return model
    flags = (unstack, rows_first)
    if _last_form and _last_form[0][0]() is model and _last_form[0][1] == flags:
        return _last_form[0][2]
    form = _decoding_form(model, unstack, rows_first)
    try:
        ref = weakref.ref(model, lambda _: _last_form.clear())
    except TypeError:  # a model that takes no weak references: converted at every call
        return form
    _last_form[:] = [(ref, flags, form)]
    return form


def generate_tokens(model: LanguageModel, prompts: list[np.ndarray], *, max_new_tokens: int,
                    temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, seeds: list[int] | None = None,
                    use_cache: bool = True, context: str | None = None,
                    keep: float = 0.5) -> Iterator[np.ndarray]:
    """Yield `(batch, k)` arrays of new tokens, at most `CHUNK` at a time, for prompts of any
    lengths; `context` and `keep` as in the module docstring.

    Row i draws its randomness from `seeds[i]` alone, so a row equals generating it by itself.
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, context, keep)
    require(model, LanguageModel, "gptzoo sample")
    context = context or default_context(model, use_cache)
    check_context(model, context, use_cache)
    use_cache = use_cache and can_decode(model)
    w = model.block_size
    prompts = [np.asarray(p[-w:], dtype=np.int32) for p in prompts]
    if not prompts:
        raise GptzooError("no prompts to generate from; pass at least one")
    if any(len(p) == 0 for p in prompts):
        raise GptzooError("a prompt is empty after tokenizing; pass at least one character")
    if max_new_tokens == 0:
        return
    n_keep = max(1, int(keep * w))
    # When the window will fill, each shift re-encodes n_keep tokens per row: a prompt padded to
    # that length shares the shifts' program (compiling or loading one costs ~1 s at start-up).
    shifts = context == "shift" and max(map(len, prompts)) + max_new_tokens > w + 1
    padded, lengths, keys = _prompt_batch(prompts, seeds, w, n_keep if shifts else None)
    model = _for_decoding(model, len(padded))
    sampling = (float(temperature), top_k, top_p)
    state, vocab = _prefill(model, padded, lengths, keys, np.int32(0), sampling, use_cache)
    n_rows = len(prompts)
    yield np.asarray(state.token)[:n_rows, None]
    position, remaining = lengths.copy(), max_new_tokens - 1  # tracked on the host as well
    by_extent = _reads_by_extent(model, state.cache)
    while remaining > 0:
        full = position >= w  # rows whose next token does not fit the window
        if context == "shift" and full.any():
            state = _shift_context(model, state, position, full, n_keep, sampling, use_cache)
            position, remaining = np.where(full, n_keep, position + 1), remaining - 1
            yield np.asarray(state.token)[:n_rows, None]
            continue
        recompute = bool(not use_cache or (context == "crop" and full.any()))
        n = min(CHUNK, remaining)
        if context == "shift" or (context == "crop" and not recompute):
            n = min(n, w - position.max())  # stop where the window fills
        extent = _extent(w, int(position.max()) + n) if by_extent else w
        state, tokens = _decode_chunk(model, state, jnp.int32(n), sampling, recompute, vocab,
                                      extent)
        position, remaining = position + n, remaining - n
        yield np.asarray(tokens[:n_rows, :n])


def _prompt_batch(prompts: list[np.ndarray], seeds: list[int] | None, w: int,
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
    for row, p in zip(padded, prompts):
        row[: len(p)] = p
    return padded, lengths, np.stack([jax.random.PRNGKey(s) for s in seeds])


def _shift_context(model, state: State, position: np.ndarray, full: np.ndarray, n_keep: int,
                   sampling: tuple, use_cache: bool) -> State:
    """One token for every row, after the `full` rows' context shift. When every row is full,
    the shift is a prefill of each row's last `n_keep` tokens (the one to feed included)."""
    if not full.all():
        return _shift(model, state, jnp.asarray(full), n_keep, sampling)
    slots = (position[:, None] - n_keep + 1 + np.arange(n_keep)) % model.block_size
    kept = np.take_along_axis(np.asarray(state.ring), slots, axis=1)
    # Host arrays, as the prompt's were: arguments already on the device would lower it again.
    state, _ = _prefill(model, kept, np.full(len(position), n_keep, np.int32),
                        np.asarray(state.keys), np.asarray(state.t), sampling, use_cache)
    return state


def _encode_prompt(tokenizer: Tokenizer, prompt: str) -> np.ndarray:
    # An empty prompt starts from the tokenizer's choice: a newline, or end-of-text for BPE.
    return tokenizer.encode(prompt) if prompt else tokenizer.start_tokens()


def stream_batch(model: LanguageModel, tokenizer: Tokenizer, prompts: list[str], *,
                 max_new_tokens: int = 500, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seeds: list[int] | None = None,
                 stop: str | None = None, use_cache: bool = True, context: str | None = None,
                 keep: float = 0.5) -> Iterator[list[str]]:
    """Yield, for each prompt, the next piece of its continuation; after `stop` a row yields ''."""
    texts = ["" for _ in prompts]
    decoders = [TextStream(tokenizer) for _ in prompts]
    for tokens in generate_tokens(model, [_encode_prompt(tokenizer, p) for p in prompts],
                                  max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seeds=seeds, use_cache=use_cache,
                                  context=context, keep=keep):
        pieces = [_until_stop(t, d.push(row), stop) for t, d, row in zip(texts, decoders, tokens)]
        texts = [t + p for t, p in zip(texts, pieces)]
        yield pieces
        if stop is not None and all(stop in t for t in texts):
            return
    rest = [_until_stop(t, d.flush(), stop) for t, d in zip(texts, decoders)]
    if any(rest):  # a character cut short by the end of generation
        yield rest


class TextStream:
    """Decodes one row's tokens as they arrive. A byte-level tokenizer may split a UTF-8
    character across tokens, and so across chunks: a piece that ends inside a character
    (decoded as U+FFFD) is held back until the rest arrives, for at most `hold` tokens."""

    def __init__(self, tokenizer: Tokenizer, hold: int = 8):
        self.tokenizer, self.hold, self.pending = tokenizer, hold, []

    def push(self, tokens) -> str:
        self.pending += [int(t) for t in tokens]
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < self.hold:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text, self.pending = self.tokenizer.decode(self.pending) if self.pending else "", []
        return text


def _until_stop(text: str, piece: str, stop: str | None) -> str:
    """`piece` cut just after the first `stop` in `text + piece` ('' once `text` holds it)."""
    if stop is None or stop not in text + piece:
        return piece
    return (text + piece)[: (text + piece).index(stop) + len(stop)][len(text):]


def stream(model: LanguageModel, tokenizer: Tokenizer, prompt: str = "", *, seed: int = 0,
           **kwargs) -> Iterator[str]:
    """Yield the continuation of one prompt piece by piece (the prompt is not repeated).

    Keyword arguments as `generate`.
    """
    for pieces in stream_batch(model, tokenizer, [prompt], seeds=[seed], **kwargs):
        yield pieces[0]


def generate(model: LanguageModel, tokenizer: Tokenizer, prompt: str | list[str] = "", *,
             seed: int = 0, **kwargs) -> str | list[str]:
    """Each prompt followed by its continuation.

    Options: `max_new_tokens` (500), `temperature` (1.0; 0 is greedy), `top_k`, `top_p`,
    `stop` (a string that ends a row's text), `use_cache` (True), `context` ("shift", "crop",
    "slide" or None: slide for a sliding-window model, else shift) and `keep` (0.5), as in
    `gptzoo.sample`. Every row uses `seed`.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    texts = list(prompts)
    for pieces in stream_batch(model, tokenizer, prompts, seeds=[seed] * len(prompts), **kwargs):
        texts = [t + p for t, p in zip(texts, pieces)]
    return texts[0] if isinstance(prompt, str) else texts
