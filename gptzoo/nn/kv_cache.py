import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from gptzoo.nn._typecheck import typecheck


class KVCache(eqx.Module):
    """One example's past keys and values for one attention layer, preallocated to `size` slots.

    Heads come first, so each head's keys and values are one contiguous read per decoded token,
    which is bound by memory bandwidth (docs/benchmarks.md, "Design choices"). Within a head, keys
    are `(size, head_dim)` and values `(head_dim, size)`: the layouts XLA:CPU's matrix-vector
    products take as they are (the other way round, it transposed every layer's whole cache at
    every token).
    Position p lives in slot `p % size`, so past `size` positions the cache is a ring holding the
    last `size` of them: a rolling cache for sliding-window attention (`size` = the window), and
    for a full-attention model a sliding context. `positions` records the position each slot
    holds (-1: empty), and `visible` lets a query see exactly the keys at or before it and inside
    the window, so stale slots (prompt padding, overwritten positions) are never read.
    Negative positions are padding: never written, never seen.

    **Arguments:**

    - `k`: the keys, `(kv_heads, size, head_dim)`.
    - `v`: the values, `(kv_heads, head_dim, size)`.
    - `positions`: the position each slot holds, -1 where it holds none.

    `KVCache.empty` makes an empty one.
    """

    k: Float[Array, "kv_heads size head_dim"]
    v: Float[Array, "kv_heads head_dim size"]
    positions: Int[Array, " size"]

    @classmethod
    def empty(cls, size: int, kv_heads: int, head_dim: int, dtype=jnp.float32) -> "KVCache":
        """A cache of `size` empty slots for `kv_heads` heads of `head_dim`, in `dtype`."""
        return cls(jnp.zeros((kv_heads, size, head_dim), dtype),
                   jnp.zeros((kv_heads, head_dim, size), dtype),
                   jnp.full(size, -1, dtype=jnp.int32))

    @property
    def size(self) -> int:
        return self.positions.shape[0]

    def prefix(self, n: int) -> "KVCache":
        """Its first `n` slots as a cache of `n` slots, equal to it while every position it holds
        and is given is below `n` (so that a decode step reads no empty slots). Any leading
        (batch) axes are kept."""
        return KVCache(self.k[..., :n, :], self.v[..., :n], self.positions[..., :n])

    def with_prefix(self, prefix: "KVCache") -> "KVCache":
        """This cache with its first slots replaced by `prefix`'s (the inverse of `prefix`)."""
        n = prefix.positions.shape[-1]
        return KVCache(self.k.at[..., :n, :].set(prefix.k), self.v.at[..., :n].set(prefix.v),
                       self.positions.at[..., :n].set(prefix.positions))

    @typecheck
    def update(
        self, k: Float[Array, "seq kv_heads head_dim"], v: Float[Array, "seq kv_heads head_dim"],
        positions: Int[Array, " seq"],
    ) -> "KVCache":
        """The cache with `positions` written to their slots, except padding (negative
        positions) and all but the last `size` positions when more come at once."""
        kept = (positions >= 0) & (positions > positions.max() - self.size)
        slots = jnp.where(kept, positions % self.size, self.size)  # out of range: dropped
        k, v = jnp.swapaxes(k, 0, 1), jnp.transpose(v, (1, 2, 0))
        return KVCache(self.k.at[:, slots].set(k.astype(self.k.dtype), mode="drop"),
                       self.v.at[:, :, slots].set(v.astype(self.v.dtype), mode="drop"),
                       self.positions.at[slots].set(positions, mode="drop"))

    @typecheck
    def key_positions(self, positions: Int[Array, " seq"]) -> Int[Array, " keys"]:
        """The positions of the keys that `positions` attend to while they are added: the
        cache's slots followed by the new positions themselves. A slot holding the first new
        position or a later one is stale (a prompt's padding, an abandoned continuation) and
        shows -1; an older one is read before the new positions overwrite it."""
        stale = self.positions >= positions[0]
        return jnp.concatenate([jnp.where(stale, -1, self.positions), positions])

    @typecheck
    def visible(self, key_positions: Int[Array, " k"], q_positions: Int[Array, " q"],
                window: int) -> Bool[Array, "q k"]:
        """Which keys each query sees: filled, at or before it, and among its `window` most
        recent positions (at most the cache's size, all it can hold)."""
        key_positions, query_positions = key_positions[None, :], q_positions[:, None]
        return ((key_positions >= 0) & (key_positions <= query_positions)
                & (key_positions > query_positions - window))
