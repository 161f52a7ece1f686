import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from gptzoo.nn.attention import attend, causal_attend
from gptzoo.nn.attention_inputs import (
    AttentionVariant,
    CacheRead,
    check_unwindowed,
    shared_heads,
)
from gptzoo.nn.self_attention import CausalSelfAttention


class MemoryKVAttention(AttentionVariant):
    """Causal self-attention with learned memory key/values (persistent memory, Sukhbaatar et al.
    2019; x-transformers' `attn_num_mem_kv`): `num_mem_kv` learned keys and values per key/value
    head, prepended to every sequence's keys and values.

    Every query sees every memory slot: they sit before position 0, so the causal mask of the
    last `seq` of `num_mem_kv + seq` keys leaves them visible to all. The position hook does not
    touch them (no rotation; a bias such as ALiBi's is zero for them), so they carry no position.
    `attention` supplies the projections, heads, position hook and dropout.

    **Arguments:**

    - `attention`: the `CausalSelfAttention` whose keys and values get the memory.
    - `num_mem_kv`: memory slots per key/value head.
    - `init_std`: the memory's initial standard deviation (x-transformers draws N(0, 1)).
    - `key`: a PRNG key for the memory's initialisation.
    """

    memory_k: Float[Array, "kv_heads num_mem_kv head_dim"]
    memory_v: Float[Array, "kv_heads num_mem_kv head_dim"]

    def __init__(self, attention: CausalSelfAttention, num_mem_kv: int, *,
                 init_std: float = 1.0, key: PRNGKeyArray):
        k_key, v_key = jax.random.split(key)
        shape = (attention.n_kv_heads, num_mem_kv, attention.head_dim)
        self.attention = attention
        self.memory_k = init_std * jax.random.normal(k_key, shape)
        self.memory_v = init_std * jax.random.normal(v_key, shape)

    def __check_init__(self):
        check_unwindowed("MemoryKVAttention", self.attention)
        if self.num_mem_kv < 1:
            raise ValueError(f"MemoryKVAttention num_mem_kv={self.num_mem_kv} must be a positive "
                             "number of slots; pass e.g. 4, or use the attention alone")

    @property
    def num_mem_kv(self) -> int:
        return self.memory_k.shape[1]

    def _attend_sequence(self, q, k, v, bias, key):
        k = jnp.concatenate([self._memory(self.memory_k, k), k], axis=-3)
        v = jnp.concatenate([self._memory(self.memory_v, v), v], axis=-3)
        # Keys [memory, 0 .. seq-1] for the last seq positions: on every path of causal_attend
        # (block-causal included) query i sees the memory and the keys up to its own.
        return causal_attend(q, k, v, self._memory_bias(bias),
                             dropout=self.attention.attn_dropout, key=key)

    def _attend_cache(self, read: CacheRead):
        keys = jnp.concatenate([self._memory(self.memory_k, read.keys), read.keys])
        values = jnp.concatenate([self._memory(self.memory_v, read.values), read.values])
        always = jnp.ones((read.q.shape[0], self.num_mem_kv), bool)
        visible = jnp.concatenate([always, read.visible], axis=-1)
        n_heads = self.attention.n_heads
        return attend(read.q, shared_heads(keys, n_heads), shared_heads(values, n_heads),
                      visible, self._memory_bias(read.bias))

    def _memory(self, memory: Float[Array, "kv_heads num_mem_kv head_dim"],
                like: Float[Array, "*batch k kv_heads head_dim"]
                ) -> Float[Array, "*batch num_mem_kv kv_heads head_dim"]:
        """The memory sequence-first, broadcast over `like`'s batch and in its dtype."""
        memory = jnp.swapaxes(memory, 0, 1).astype(like.dtype)
        return jnp.broadcast_to(memory, (*like.shape[:-3], *memory.shape))

    def _memory_bias(self, bias: Float[Array, "heads q k"] | None
                     ) -> Float[Array, "heads q mem_k"] | None:
        """A position bias with zeros in front for the memory slots, which have no position."""
        return None if bias is None else jnp.pad(bias, ((0, 0), (0, 0), (self.num_mem_kv, 0)))
