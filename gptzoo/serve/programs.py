"""The server's device programs: a prompt's prefill into one decode slot, and a chunk of decode
steps over the leading slots at once.

A slot is one generation in progress: its KV cache, the token to feed next and its position, its
random key and draw count, and its own sampling settings, all arrays with a leading slot axis, so
that one compiled program serves every mix of requests. Sampling is `gptzoo.sample`'s, row by
row: draw t of a generation takes its Gumbel noise from `fold_in(key, t)` alone (the first new
token is draw 0), so an answer does not depend on its neighbours.
"""

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from gptzoo.nn import Stack, rowwise_layout, unstacked
from gptzoo.nn.rowwise import MIN_ROWS
from gptzoo.sample import CHUNK
from gptzoo.sample.pick import nucleus, row_noise
from gptzoo.stored_jit import stored_jit

MAX_LOGPROBS = 5  # alternatives reported per token: OpenAI's most for completions


class Slots(NamedTuple):
    """Every slot's generation; `token` is sampled (and delivered) but not yet fed."""

    cache: object  # the model's cache with a leading slot axis
    token: Int[Array, " slots"]
    position: Int[Array, " slots"]  # the position `token` is fed at
    key: PRNGKeyArray  # (slots, 2)
    t: Int[Array, " slots"]  # index of the next draw
    temperature: Float[Array, " slots"]  # 0: greedy
    top_k: Int[Array, " slots"]  # the vocabulary's size: no top-k
    top_p: Float[Array, " slots"]  # 1: no nucleus


class TokenInfo(NamedTuple):
    """Log-probabilities under the model's own distribution (before temperature or filtering):
    of the chosen token, and of the `MAX_LOGPROBS` most likely ones, most likely first."""

    logprob: Float[Array, "*n"]
    top_ids: Int[Array, "*n k"]
    top_logprobs: Float[Array, "*n k"]


def decoding_forms(model, n_slots: int) -> tuple[object, object]:
    """The model as the decode programs read it, as `gptzoo.sample` converts it: blocks written
    out (each updates its own cache in place); and for `MIN_ROWS` rows or more on CPU, also
    with its weights in `rowwise_layout` (a second copy). Returns (the plain form, which
    prefills and narrow chunks read, the row-wise form, which the engine times against it for
    wider chunks), the same model twice when they do not differ."""
    if any(isinstance(x, Stack) for x in jax.tree.leaves(model, is_leaf=_is_stack)):
        model = unstacked(model)
    if n_slots >= MIN_ROWS and jax.default_backend() == "cpu":
        return model, rowwise_layout(model)
    return model, model


def _is_stack(x) -> bool:
    return isinstance(x, Stack)


def widths(n_slots: int) -> list[int]:
    """How many leading slots a decode chunk may run: powers of two below `n_slots`, and
    `n_slots`; one program each, so a lone request decodes one row, not every slot."""
    return [w for w in (2**i for i in range(n_slots.bit_length())) if w < n_slots] + [n_slots]


def empty_slots(model, n_slots: int) -> Slots:
    """`n_slots` idle slots on the default device (committed, as every program output is, so
    the first call and the later ones run one program)."""
    cache = jax.tree.map(lambda x: jnp.broadcast_to(x, (n_slots, *x.shape)), model.init_cache())
    zeros = np.zeros(n_slots, np.int32)
    slots = Slots(cache, zeros, zeros, np.zeros((n_slots, 2), np.uint32), zeros,
                  np.zeros(n_slots, np.float32), zeros, np.ones(n_slots, np.float32))
    return jax.device_put(slots, jax.devices()[0])


def vocab_size(model) -> int:
    logits, _ = eqx.filter_eval_shape(model.decode, jnp.zeros(1, jnp.int32),
                                      jnp.zeros(1, jnp.int32), model.init_cache())
    return logits.shape[-1]


def pick_token(logits: Float[Array, " vocab"], noise: Float[Array, " vocab"],
               temperature: Float[Array, ""], top_k: Int[Array, ""],
               top_p: Float[Array, ""]) -> Int[Array, ""]:
    """`gptzoo.sample.pick_token` with its settings traced rather than static, so that rows
    with different settings share a program; the same operations, so the same token."""
    scaled = _scaled(logits, temperature)
    kth = jnp.sort(scaled)[logits.shape[-1] - top_k]  # top_k(scaled, k)[0][-1]
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    scaled = jnp.where(top_p >= 1, scaled, nucleus(scaled, top_p))
    return _draw(logits, scaled, noise, temperature)


def _unfiltered_pick(logits: Float[Array, " vocab"], noise: Float[Array, " vocab"],
                     temperature: Float[Array, ""]) -> Int[Array, ""]:
    """`pick_token` with no top-k and no top-p, where its filters change nothing."""
    return _draw(logits, _scaled(logits, temperature), noise, temperature)


def _scaled(logits, temperature):
    return logits / jnp.where(temperature > 0, temperature, 1)


def _draw(logits, scaled, noise, temperature):
    """The Gumbel-max draw from `scaled`, or greedy from `logits` at temperature 0."""
    return jnp.where(temperature > 0, jnp.argmax(scaled + noise), jnp.argmax(logits))


def pick_rows(logits: Float[Array, "rows vocab"], noise: Float[Array, "rows vocab"],
              slots: Slots) -> Int[Array, " rows"]:
    """Each row's token; the sorts that top-k and top-p need run only when some row asks for
    them (a vocabulary of 50,257 sorted at every token costs more than a small model's step)."""
    def greedy(_):
        return jnp.argmax(logits, axis=-1)

    def unfiltered(_):
        return jax.vmap(_unfiltered_pick)(logits, noise, slots.temperature)

    def filtered(_):
        return jax.vmap(pick_token)(logits, noise, slots.temperature, slots.top_k, slots.top_p)

    filtering = jnp.any(slots.top_k < logits.shape[-1]) | jnp.any(slots.top_p < 1)
    branch = jnp.where(filtering, 2, jnp.where(jnp.any(slots.temperature > 0), 1, 0))
    return jax.lax.switch(branch, (greedy, unfiltered, filtered), None)


def token_info(logits: Float[Array, "*n vocab"], tokens: Int[Array, "*n"]) -> TokenInfo:
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0]
    top_logprobs, top_ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
    return TokenInfo(chosen, top_ids, top_logprobs)


@jax.jit
def seed_key(seed: Int[Array, ""]) -> PRNGKeyArray:
    """`jax.random.PRNGKey(seed)`, one compiled program for every int32 seed."""
    return jax.random.PRNGKey(seed)


@stored_jit(donate="all-except-first")
def prefill(model, slots: Slots, slot: Int[Array, " rows"], tokens: Int[Array, "rows bucket"],
            length: Int[Array, " rows"], key: PRNGKeyArray, t: Int[Array, " rows"],
            settings: tuple[Array, Array, Array], echo: bool
            ) -> tuple[Slots, Int[Array, " rows"], TokenInfo, TokenInfo | None]:
    """For each row, encode `tokens[:length]` (right-padded to a bucket) at positions 0.. into
    a fresh cache in its `slot` (a slot out of range: a padding row, written nowhere), sample
    its next token (draw `t`), and with `echo` score every prompt token after the first. Also
    a context shift's re-encoding of a generation's last tokens."""
    def one(tokens, length, key, t, temperature, top_k, top_p):
        logits, cache = model.decode(tokens, jnp.arange(tokens.shape[0]), model.init_cache())
        last = logits[length - 1]
        token = pick_token(last, row_noise(key, t, 1, last.shape[-1])[0], temperature, top_k,
                           top_p)
        prompt = token_info(logits[:-1], tokens[1:]) if echo else None
        row = Slots(cache, token, length, key, t + 1, temperature, top_k, top_p)
        return row, token, token_info(last, token), prompt

    rows, token, info, prompt = jax.vmap(one)(tokens, length, key, t, *settings)
    slots = jax.tree.map(lambda every, new: every.at[slot].set(new, mode="drop"), slots, rows)
    return slots, token, info, prompt


@stored_jit(donate="all-except-first")
def decode_chunk(model, slots: Slots, n_steps: Int[Array, " width"], vocab: int
                 ) -> tuple[Slots, Int[Array, "width chunk"], TokenInfo]:
    """Up to `CHUNK` tokens for each of the first `width` slots, `n_steps[i]` for slot i (a
    slot at its count stops advancing: it feeds its token at its position again, which rewrites
    its cache entry with the same values, and its tokens past the count are not used)."""
    width = n_steps.shape[0]
    whole, slots = slots, jax.tree.map(lambda x: x[:width], slots)

    def draws(_):
        return jax.vmap(lambda k, t: row_noise(k, t, CHUNK, vocab))(slots.key, slots.t)

    shape = (width, CHUNK)
    noise = jax.lax.cond(jnp.any(slots.temperature > 0), draws,
                         lambda _: jnp.zeros((*shape, vocab), jnp.float32), None)

    def body(i, carry):
        slots, tokens, infos = carry
        logits, cache = jax.vmap(model.decode)(slots.token[:, None], slots.position[:, None],
                                               slots.cache)
        logits = logits[:, 0]
        token = pick_rows(logits, noise[:, i], slots)
        live = (i < n_steps).astype(jnp.int32)
        slots = slots._replace(cache=cache, token=jnp.where(live, token, slots.token),
                               position=slots.position + live, t=slots.t + live)
        infos = jax.tree.map(lambda out, x: out.at[:, i].set(x), infos, token_info(logits, token))
        return slots, tokens.at[:, i].set(token), infos

    empty = TokenInfo(jnp.zeros(shape), jnp.zeros((*shape, MAX_LOGPROBS), jnp.int32),
                      jnp.zeros((*shape, MAX_LOGPROBS)))
    slots, tokens, infos = jax.lax.fori_loop(0, n_steps.max(), body,
                                             (slots, jnp.zeros(shape, jnp.int32), empty))
    slots = jax.tree.map(lambda every, part: every.at[:width].set(part), whole, slots)
    return slots, tokens, infos
