import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from gptzoo.nn._typecheck import typecheck


class KVCache(eqx.Module):
    """One example's past keys and values for one attention layer, preallocated to `size` slots.

    Heads come first, so each head's keys and values are one contiguous read per decoded token
    (the step is bound by memory bandwidth; slots-first measured ~10x slower). Keys are stored
    transposed, `(kv_heads, head_dim, size)`, the layout of the `q . k` matrix product, which
    otherwise transposes the whole key cache at every step.
    Position p lives in slot `p % size`, so past `size` positions the cache is a ring holding the
    last `size` of them: a sliding window. `positions` records the position each slot holds (-1:
    empty), and `mask` lets a query see exactly the slots at or before it and inside the window,
    so stale slots (prompt padding, overwritten positions) are never read.
    """

    k: Float[Array, "kv_heads head_dim size"]
    v: Float[Array, "kv_heads size head_dim"]
    positions: Int[Array, " size"]

    @classmethod
    def empty(cls, size: int, kv_heads: int, head_dim: int, dtype=jnp.float32) -> "KVCache":
        return cls(jnp.zeros((kv_heads, head_dim, size), dtype),
                   jnp.zeros((kv_heads, size, head_dim), dtype),
                   jnp.full(size, -1, dtype=jnp.int32))

    @property
    def size(self) -> int:
        return self.positions.shape[0]

    @typecheck
    def update(
        self, k: Float[Array, "seq kv_heads head_dim"], v: Float[Array, "seq kv_heads head_dim"],
        positions: Int[Array, " seq"],
    ) -> "KVCache":
        if k.shape[0] > self.size:
            raise ValueError(f"{k.shape[0]} new positions do not fit a KV cache of {self.size}; "
                             "feed at most block_size tokens at once")
        slots = positions % self.size
        k, v = jnp.transpose(k, (1, 2, 0)), jnp.swapaxes(v, 0, 1)
        return KVCache(self.k.at[:, :, slots].set(k.astype(self.k.dtype)),
                       self.v.at[:, slots].set(v.astype(self.v.dtype)),
                       self.positions.at[slots].set(positions))

    @typecheck
    def mask(self, q_positions: Int[Array, " q"]) -> Bool[Array, "q size"]:
        key_positions, query_positions = self.positions[None, :], q_positions[:, None]
        return ((key_positions >= 0) & (key_positions <= query_positions)
                & (key_positions > query_positions - self.size))
