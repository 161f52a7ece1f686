"""The decode programs, compiled once per shape and setting and stored (`gptzoo.stored_jit`):
`prefill` the prompts, `decode_chunk` up to `CHUNK` tokens, and `shift` the context of the rows
whose window is full. Each takes and returns every row's `State`."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int, PRNGKeyArray

from gptzoo.models.protocol import CachedDecoder, LanguageModel
from gptzoo.nn.kv_cache import KVCache
from gptzoo.sample.pick import gumbel_noise, pick_token
from gptzoo.sample.settings import Sampling
from gptzoo.stored_jit import stored_jit

CHUNK = 16  # most tokens per compiled decode call; the host streams text between calls


class State(NamedTuple):
    """Every row's generation so far.

    **Arguments:**

    - `cache`: the model's cache with a leading batch axis; None when recomputing the context.
    - `token`: each row's last token, sampled (and emitted) but not yet fed.
    - `position`: the position each row's `token` is fed at.
    - `ring`: each row's last `block_size` tokens, position p in slot `p % block_size`.
    - `keys`: each row's PRNG key.
    - `t`: the index of the next draw, the same for every row (`gumbel_noise`).
    """

    cache: object
    token: Int[Array, " batch"]
    position: Int[Array, " batch"]
    ring: Int[Array, "batch block_size"]
    keys: PRNGKeyArray
    t: Int[Array, ""]


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


def _emit(state: State, logits, sampling: Sampling, noise=None) -> State:
    """Sample each row's next token from `logits` (with this draw's `noise`, `(batch, vocab)`,
    if drawn ahead) and make it the token to feed."""
    if noise is None:
        drawn = gumbel_noise(state.keys, state.t, 1, logits.shape[-1], sampling.temperature)
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
def prefill(model, prompts: Int[Array, "batch bucket"], lengths: Int[Array, " batch"],
            keys: PRNGKeyArray, t: Int[Array, ""], sampling: Sampling, use_cache: bool
            ) -> tuple[State, int]:
    """The prompts (right-padded) in one forward pass, each row's first new token (its draw `t`),
    and the size of the vocabulary (static: `decode_chunk` draws its noise before tracing the
    model). A context shift re-encodes the kept tokens through it too."""
    w = model.block_size
    ring = jnp.pad(prompts, ((0, 0), (0, w - prompts.shape[1])))
    if use_cache:
        cache, logits = _prefill_cache(model, prompts, lengths - 1)
    else:
        cache, logits = None, jax.vmap(lambda r, n: _window_logits(model, r, n))(ring, lengths - 1)
    state = _emit(State(cache, lengths * 0, lengths - 1, ring, keys, t), logits, sampling)
    return state, logits.shape[-1]


def _step(model: LanguageModel, state: State, sampling: Sampling, recompute: bool,
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


@stored_jit(donate="all-except-first")
def decode_chunk(model, state: State, n_steps: Int[Array, ""], sampling: Sampling,
                 recompute: bool, vocab: int, extent: int
                 ) -> tuple[State, Int[Array, "batch chunk"]]:
    """`n_steps <= CHUNK` tokens for every row (a traced count: one compilation serves all),
    reading the first `extent` slots of each layer's KV cache (`gptzoo.sample.layout.extent`).

    The chunk's random draws are made before its loop, so the PRNG's small operations do not run
    at every token. The cache's first slots are copied out before the loop and back after it,
    once per chunk.
    """
    noise = gumbel_noise(state.keys, state.t, CHUNK, vocab, sampling.temperature)
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
def merge_rows(take_first: Bool[Array, " batch"], first: State, second: State) -> State:
    """Row i of `first` where `take_first[i]`, else row i of `second` (`t`, shared by the rows,
    is `first`'s)."""
    def rows(a, b):
        return a if a.ndim == 0 else jnp.where(take_first.reshape(-1, *[1] * (a.ndim - 1)), a, b)
    return jax.tree.map(rows, first, second)


def shift(model, state: State, position: np.ndarray, n_keep: int, sampling: Sampling,
          use_cache: bool, vocab: int) -> State:
    """One token for every row, after the context shift of each full row (one whose `position`,
    where its token is fed, is past the window).

    A full row keeps its last `n_keep` tokens, the one to feed included, and `prefill`s them at
    positions 0..n_keep-1 as a prompt: the prompts' own program when they were padded to
    `n_keep`. When only some rows are full, the others take their ordinary decode step
    (`decode_chunk` of one token) and `merge_rows` keeps each row's own.
    """
    w = model.block_size
    full = position >= w
    slots = (position[:, None] - n_keep + 1 + np.arange(n_keep)) % w
    # Host copies, as the prompt's were (arguments already on the device would lower another
    # program), taken before `decode_chunk` donates the state.
    kept = np.take_along_axis(np.asarray(state.ring), slots, axis=1)
    keys, t = np.array(state.keys), np.array(state.t)
    shifted, _ = prefill(model, kept, np.full(len(position), n_keep, np.int32), keys, t, sampling,
                         use_cache)
    if full.all():
        return shifted
    stepped, _ = decode_chunk(model, state, jnp.int32(1), sampling, not use_cache, vocab, w)
    return merge_rows(jnp.asarray(full), shifted, stepped)
