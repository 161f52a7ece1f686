"""Picking a token from logits: greedy, or a Gumbel-max draw restricted by top-k and top-p."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray


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
        logits = nucleus(logits, top_p)
    return jnp.argmax(logits + noise)


def nucleus(logits: Float[Array, " vocab"], top_p: float | Float[Array, ""]
            ) -> Float[Array, " vocab"]:
    """`logits` with -inf outside the smallest set of tokens whose probability reaches `top_p`."""
    order = jnp.argsort(-logits)
    probs = jax.nn.softmax(logits[order])
    # Keep a token if the tokens ranked above it hold less than top_p: the smallest nucleus.
    keep_sorted = jnp.cumsum(probs) - probs < top_p
    keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def gumbel_noise(keys: PRNGKeyArray, t: Int[Array, ""], n: int, vocab: int,
                 temperature: float) -> Float[Array, "batch n vocab"] | None:
    """The Gumbel noise of each row's draws `t .. t + n - 1` (None when greedy): draw t of row i
    comes from `fold_in(keys[i], t)` alone, so a row draws the same wherever it is batched and
    however its draws are grouped into programs."""
    if temperature == 0:
        return None
    return jax.vmap(lambda key: row_noise(key, t, n, vocab))(keys)


def row_noise(key: PRNGKeyArray, t: Int[Array, ""], n: int, vocab: int
              ) -> Float[Array, "n vocab"]:
    """The Gumbel noise of draws `t .. t + n - 1` of the generation whose key is `key`."""
    return jax.vmap(lambda i: jax.random.gumbel(jax.random.fold_in(key, i), (vocab,)))(
        t + jnp.arange(n))
