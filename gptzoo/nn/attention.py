import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from gptzoo.nn._typecheck import typecheck
from gptzoo.nn.kv_cache import KVCache
from gptzoo.nn.linear import Linear


@typecheck
def causal_mask(n_queries: int, n_keys: int) -> Bool[Array, "q k"]:
    """Query i (the i-th of the last `n_queries` positions) may see keys up to its own position."""
    offset = n_keys - n_queries
    return jnp.arange(n_queries)[:, None] + offset >= jnp.arange(n_keys)[None, :]


@typecheck
def attention_weights(
    q: Float[Array, "*batch q heads head_dim"],
    k: Float[Array, "*batch k heads head_dim"],
    mask: Bool[Array, "q k"],
    bias: Float[Array, "heads q k"] | None = None,
) -> Float[Array, "*batch heads q k"]:
    """softmax(q k^T / sqrt(head_dim) + bias) over the keys each query may see."""
    scores = jnp.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    return jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)


@typecheck
def attend(
    q: Float[Array, "*batch q heads head_dim"],
    k: Float[Array, "*batch k heads head_dim"],
    v: Float[Array, "*batch k heads head_dim"],
    mask: Bool[Array, "q k"],
    bias: Float[Array, "heads q k"] | None = None,
) -> Float[Array, "*batch q heads head_dim"]:
    """Scaled dot-product attention."""
    return jnp.einsum("...hqk,...khd->...qhd", attention_weights(q, k, mask, bias), v)


class CausalSelfAttention(eqx.Module):
    """Multi-head causal self-attention (GPT-2), written with `jnp.einsum`.

    `n_kv_heads < n_heads` is grouped-query attention (Ainslie et al. 2023): each run of
    `n_heads // n_kv_heads` query heads shares one key/value head; `n_kv_heads=1` is multi-query
    attention (Shazeer 2019). `positional` (e.g. `Rotary`, `ALiBi`) maps
    `(q, k, q_positions, k_positions)` to `(q, k, bias or None)`, the bias `(heads, q, k)` added to
    the scores; it sees `positions` (default `arange(seq)`), which are otherwise unused.
    `head_dim` (default `d_model // n_heads`) sets the width of each head; `qkv_bias` (default
    `use_bias`) gives the q/k/v projection a bias of its own choosing, as Qwen2 does.
    """

    qkv: Linear
    out: Linear
    attn_dropout: eqx.nn.Dropout
    resid_dropout: eqx.nn.Dropout
    n_heads: int = eqx.field(static=True)
    n_kv_heads: int = eqx.field(static=True)
    positional: eqx.Module | None = None

    def __init__(
        self, d_model: int, n_heads: int, *, n_kv_heads: int | None = None,
        head_dim: int | None = None, positional: eqx.Module | None = None, dropout: float = 0.0,
        use_bias: bool = True, qkv_bias: bool | None = None, init_std: float = 0.02,
        out_init_std: float = 0.02, key: PRNGKeyArray,
    ):
        if head_dim is None and d_model % n_heads:
            raise ValueError(
                f"d_model={d_model} is not divisible by n_heads={n_heads}; "
                "choose n_heads that divides d_model, or pass head_dim"
            )
        qkv_key, out_key = jax.random.split(key)
        self.n_heads = n_heads
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.positional = positional
        # head_dim defaults to d_model / n_heads; published models may pick another (Gemma, Qwen3).
        head_dim = d_model // n_heads if head_dim is None else head_dim
        # One fused matmul for q (n_heads) then k and v (n_kv_heads each): 3 * d_model wide for MHA.
        qkv_width = (n_heads + 2 * self.n_kv_heads) * head_dim
        qkv_bias = use_bias if qkv_bias is None else qkv_bias  # Qwen2: biased q/k/v, plain out
        self.qkv = Linear(d_model, qkv_width, use_bias=qkv_bias, init_std=init_std, key=qkv_key)
        self.out = Linear(n_heads * head_dim, d_model, use_bias=use_bias, init_std=out_init_std,
                          key=out_key)
        self.attn_dropout = eqx.nn.Dropout(dropout)
        self.resid_dropout = eqx.nn.Dropout(dropout)

    def __check_init__(self):
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}; choose a "
                "divisor of n_heads (1 is multi-query attention, n_heads or None plain multi-head)"
            )

    @property
    def head_dim(self) -> int:
        return self.out.weight.shape[0] // self.n_heads

    @typecheck
    def __call__(
        self, x: Float[Array, "*batch seq d_model"], *,
        positions: Int[Array, " seq"] | None = None, key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch seq d_model"]:
        seq = x.shape[-2]
        positions = jnp.arange(seq) if positions is None else positions
        q, k, v = self._heads(x)
        return self._attend(q, k, v, positions, positions, causal_mask(seq, seq), key)

    def init_cache(self, size: int) -> KVCache:
        return KVCache.empty(size, self.n_kv_heads, self.head_dim, self.out.weight.dtype)

    @typecheck
    def decode(
        self, x: Float[Array, "seq d_model"], positions: Int[Array, " seq"], cache: KVCache
    ) -> tuple[Float[Array, "seq d_model"], KVCache]:
        """Attention for one example's new positions over its cache, which they are added to.

        Keys are cached after the position hook (a rotary key depends on its own position only),
        so a step reads each cached key once and cached decoding equals the full forward.
        """
        seq = x.shape[0]
        q, k, v = self._heads(x)
        bias = None
        if self.positional is not None:
            q, k, _ = self.positional(q, k, positions, positions)
        cache = cache.update(k, v, positions)
        if self.positional is not None:
            # A bias (ALiBi) depends on the positions alone: the keys passed are placeholders,
            # and a hook that returns no bias (rotary) is compiled away.
            placeholder = jnp.zeros((cache.size, self.n_kv_heads, self.head_dim), q.dtype)
            _, _, bias = self.positional(q, placeholder, positions, cache.positions)
        # Query heads grouped by the key/value head they share: no copy of the cache per group.
        group = self.n_heads // self.n_kv_heads
        q = q.reshape(seq, self.n_kv_heads, group, self.head_dim)
        scores = jnp.einsum("qkgd,kds->kgqs", q, cache.k) / math.sqrt(self.head_dim)
        if bias is not None:
            scores = scores + bias.reshape(self.n_kv_heads, group, seq, cache.size)
        weights = jax.nn.softmax(jnp.where(cache.mask(positions), scores, -jnp.inf), axis=-1)
        y = jnp.einsum("kgqs,ksd->qkgd", weights, cache.v).reshape(seq, -1)
        return self.out(y), cache

    def _heads(self, x):
        qkv = self.qkv(x).reshape(*x.shape[:-1], self.n_heads + 2 * self.n_kv_heads, -1)
        return jnp.split(qkv, [self.n_heads, self.n_heads + self.n_kv_heads], axis=-2)

    def _attend(self, q, k, v, q_positions, k_positions, mask, key):
        *batch, seq, _, _ = q.shape
        attn_key, resid_key = jax.random.split(key) if key is not None else (None, None)
        bias = None
        if self.positional is not None:
            q, k, bias = self.positional(q, k, q_positions, k_positions)
        # Repeating the shared k/v heads measured faster on CPU than a grouped einsum that avoids
        # the copy, and is a no-op for plain multi-head attention.
        k, v = (jnp.repeat(a, self.n_heads // self.n_kv_heads, axis=-2) for a in (k, v))
        weights = attention_weights(q, k, mask, bias)
        weights = self.attn_dropout(weights, key=attn_key, inference=key is None)
        y = jnp.einsum("...hqk,...khd->...qhd", weights, v).reshape(*batch, seq, -1)
        return self.resid_dropout(self.out(y), key=resid_key, inference=key is None)
