"""`AttentionVariant`, the base of attention variants built around a `CausalSelfAttention`
(memory key/values, talking heads), and what they read from it: its queries, keys and values
after its position hook, over a whole sequence or over one example's KV cache, and its output
projection. The variants reuse the wrapped module's weights and hook, so they change how the
scores are formed and nothing else. `positioned` splits q/k/v with `CausalSelfAttention._heads`,
so whatever that module does to its heads there carries over to the variants; anything it does
only inside its own `_attend` or `decode` does not."""

import abc
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from gptzoo.nn._typecheck import typecheck
from gptzoo.nn.kv_cache import KVCache
from gptzoo.nn.linear import projection_keys
from gptzoo.nn.self_attention import CausalSelfAttention


class Positioned(NamedTuple):
    """Queries, keys and values of a sequence after the position hook, and its score bias."""

    q: Float[Array, "*batch seq heads head_dim"]
    k: Float[Array, "*batch seq kv_heads head_dim"]
    v: Float[Array, "*batch seq kv_heads head_dim"]
    bias: Float[Array, "heads seq seq"] | None


def positioned(attention: CausalSelfAttention, x: Float[Array, "*batch seq d_model"],
               positions: Int[Array, " seq"], key: PRNGKeyArray | None = None) -> Positioned:
    """`attention`'s projections of `x` (at `positions`), passed through its position hook;
    `key` is the q/k/v projection's (an adapter's input dropout, `projection_keys`)."""
    q, k, v = attention._heads(x, key)
    if attention.positional is None:
        return Positioned(q, k, v, None)
    q, k, bias = attention.positional(q, k, positions, positions)
    return Positioned(q, k, v, bias)


class CacheRead(NamedTuple):
    """One example's new positions against its cache: the queries, the new keys and values (in
    the cache's dtype, to write into it), every key and value they attend to (the cache's slots,
    then their own), which of those each query sees, and the score bias over them."""

    q: Float[Array, "seq heads head_dim"]
    k: Float[Array, "seq kv_heads head_dim"]
    v: Float[Array, "seq kv_heads head_dim"]
    keys: Float[Array, "keys kv_heads head_dim"]
    values: Float[Array, "keys kv_heads head_dim"]
    visible: Bool[Array, "seq keys"]
    bias: Float[Array, "heads seq keys"] | None


def read_cache(attention: CausalSelfAttention, x: Float[Array, "seq d_model"],
               positions: Int[Array, " seq"], cache: KVCache) -> CacheRead:
    """The new positions `x` at `positions` over `cache`, as `CausalSelfAttention.decode` reads
    them: keys are cached after the position hook, and a bias (ALiBi) comes from the positions
    alone, so the hook sees placeholder keys at the cache's positions. Written out plainly (the
    cache copied into one key array), not tuned like `CausalSelfAttention.decode`."""
    q, k, v, _ = positioned(attention, x, positions)
    key_positions = cache.key_positions(positions)
    bias = None
    if attention.positional is not None:
        placeholder = jnp.zeros((key_positions.shape[0], *k.shape[1:]), q.dtype)
        _, _, bias = attention.positional(q, placeholder, positions, key_positions)
    k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
    keys = jnp.concatenate([jnp.swapaxes(cache.k, 0, 1), k])
    values = jnp.concatenate([jnp.transpose(cache.v, (2, 0, 1)), v])
    return CacheRead(q, k, v, keys, values, cache.visible(key_positions, positions, cache.size),
                     bias)


def shared_heads(a: Float[Array, "*batch k kv_heads head_dim"], n_heads: int
                 ) -> Float[Array, "*batch k heads head_dim"]:
    """Grouped-query keys or values repeated so that query head h reads kv head
    `h // (n_heads // kv_heads)`."""
    return jnp.repeat(a, n_heads // a.shape[-2], axis=-2)


def project_out(attention: CausalSelfAttention, y: Float[Array, "*batch seq heads head_dim"],
                key: PRNGKeyArray | None, projection_key: PRNGKeyArray | None = None
                ) -> Float[Array, "*batch seq d_model"]:
    """`attention`'s output projection of the heads `y` (`projection_key`: the projection's
    own, as in `positioned`), then its residual dropout (on when `key` is given)."""
    out = attention.out(y.reshape(*y.shape[:-2], -1), key=projection_key)
    return attention.resid_dropout(out, key=key, inference=key is None)


def split_key(key: PRNGKeyArray | None) -> tuple[PRNGKeyArray | None, PRNGKeyArray | None]:
    """Keys for attention dropout and residual dropout, or two Nones without dropout."""
    return tuple(jax.random.split(key)) if key is not None else (None, None)


def check_unwindowed(wrapper: str, attention) -> None:
    """The wrappers attend over the whole context: refuse a sliding-window attention, whose band
    they would silently ignore."""
    if attention.window is not None:
        raise ValueError(f"{wrapper} wraps attention with window={attention.window}, which it "
                         "does not support; wrap a CausalSelfAttention with window=None")


class AttentionVariant(eqx.Module):
    """A `CausalSelfAttention` (`attention`: its projections, heads, position hook, dropout and
    KV cache) whose queries attend to keys in a way of the subclass's own: `_attend_sequence` over
    a whole sequence, `_attend_cache` over one example's cache. Training and decoding around them
    are the same for every variant, so they are written once here."""

    attention: CausalSelfAttention

    @abc.abstractmethod
    def _attend_sequence(self, q, k, v, bias, key):
        """Heads `(*batch, seq, heads, head_dim)` of `q` over `k`, `v` (causal), with `bias`;
        attention dropout from `key` (None: off)."""

    @abc.abstractmethod
    def _attend_cache(self, read: CacheRead):
        """Heads `(seq, heads, head_dim)` of `read.q` over what `read` says each query sees."""

    @typecheck
    def __call__(
        self, x: Float[Array, "*batch seq d_model"], *,
        positions: Int[Array, " seq"] | None = None, key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch seq d_model"]:
        positions = jnp.arange(x.shape[-2]) if positions is None else positions
        qkv_key, out_key = projection_keys(key, 2)
        q, k, v, bias = positioned(self.attention, x, positions, qkv_key)
        attn_key, resid_key = split_key(key)
        y = self._attend_sequence(q, k, v, bias, attn_key)
        return project_out(self.attention, y, resid_key, out_key)

    def init_cache(self, size: int) -> KVCache:
        """The wrapped attention's cache: a variant keeps no decoding state of its own."""
        return self.attention.init_cache(size)

    @typecheck
    def decode(
        self, x: Float[Array, "seq d_model"], positions: Int[Array, " seq"], cache: KVCache
    ) -> tuple[Float[Array, "seq d_model"], KVCache]:
        """`__call__` for one example's new positions over its cache, which they are added to."""
        read = read_cache(self.attention, x, positions, cache)
        y = self._attend_cache(read)
        return project_out(self.attention, y.astype(x.dtype), None), cache.update(
            read.k, read.v, positions)
