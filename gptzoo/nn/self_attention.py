"""`CausalSelfAttention`: the attention module of every block, with its KV-cached decoding."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from gptzoo.nn._typecheck import typecheck
from gptzoo.nn.attention import causal_attend, check_window, einsum_f32
from gptzoo.nn.kv_cache import KVCache
from gptzoo.nn.linear import Linear, projection_keys
from gptzoo.nn.rmsnorm import RMSNorm
from gptzoo.workarounds import read_before_write

QK_NORMS = ("head", "projection")
# The score of a key a query may not see: finite, so that a query that sees none (padding, at a
# negative position) averages the values instead of giving NaN, which would reach the real
# queries through the zero weights of the next layer's products.
MASKED = float(jnp.finfo(jnp.float32).min)


class CausalSelfAttention(eqx.Module):
    """Multi-head causal self-attention (GPT-2), written with `jnp.einsum`.

    `n_kv_heads < n_heads` is grouped-query attention (Ainslie et al. 2023): each run of
    `n_heads // n_kv_heads` query heads shares one key/value head; `n_kv_heads=1` is multi-query
    attention (Shazeer 2019). `window` is sliding-window attention (Mistral): a query sees the
    `window` most recent positions, its own included, and the KV cache keeps only those. `qk_norm`
    normalises the queries and keys before the position hook (Qwen3, OLMo 2).

    **Arguments:**

    - `d_model`: width of the input and output.
    - `n_heads`: number of query heads.
    - `n_kv_heads`: number of key/value heads (default `n_heads`); must divide `n_heads`.
    - `head_dim`: width of each head (default `d_model // n_heads`; Gemma and Qwen3 pick another).
    - `positional`: a position hook (`Rotary`, `ALiBi`) mapping `(q, k, q_positions,
        k_positions)` to `(q, k, bias or None)`, the bias `(heads, q, k)` added to the scores; or
        None. It sees `positions` (default `arange(seq)`), which are otherwise unused.
    - `window`: the number of most recent positions a query sees, its own included; None (the
        default) sees all earlier positions.
    - `qk_norm`: None (the default); "head", an RMSNorm over each head's `head_dim` channels with
        one scale `(head_dim,)` shared by the heads (Qwen3); or "projection", an RMSNorm over the
        whole query projection `(n_heads * head_dim,)` and key projection
        `(n_kv_heads * head_dim,)` (OLMo 2). Held in `q_norm` and `k_norm`.
    - `qk_norm_eps`: the epsilon of those RMSNorms.
    - `dropout`: dropout rate of the attention weights and of the output.
    - `use_bias`: whether the projections have biases.
    - `qkv_bias`: whether the q/k/v projection has one (default `use_bias`; Qwen2: biased q/k/v,
        plain output).
    - `init_std`, `out_init_std`: standard deviations of the q/k/v and output weights at init.
    - `key`: a `jax.random.PRNGKey` for the initial weights.
    """

    qkv: Linear
    out: Linear
    attn_dropout: eqx.nn.Dropout
    resid_dropout: eqx.nn.Dropout
    n_heads: int = eqx.field(static=True)
    n_kv_heads: int = eqx.field(static=True)
    positional: eqx.Module | None = None
    q_norm: RMSNorm | None = None
    k_norm: RMSNorm | None = None
    window: int | None = eqx.field(static=True, default=None)
    qk_norm: str | None = eqx.field(static=True, default=None)

    def __init__(
        self, d_model: int, n_heads: int, *, n_kv_heads: int | None = None,
        head_dim: int | None = None, positional: eqx.Module | None = None,
        window: int | None = None, qk_norm: str | None = None, qk_norm_eps: float = 1e-6,
        dropout: float = 0.0, use_bias: bool = True, qkv_bias: bool | None = None,
        init_std: float = 0.02, out_init_std: float = 0.02, key: PRNGKeyArray,
    ):
        if head_dim is None and d_model % n_heads:
            raise ValueError(
                f"d_model={d_model} is not divisible by n_heads={n_heads}; "
                "choose n_heads that divides d_model, or pass head_dim"
            )
        if qk_norm not in (None, *QK_NORMS):
            raise ValueError(f"qk_norm={qk_norm!r} is not one of None, {', '.join(QK_NORMS)}: "
                             "pass head (Qwen3) or projection (OLMo 2)")
        qkv_key, out_key = jax.random.split(key)
        self.n_heads = n_heads
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.positional = positional
        self.window, self.qk_norm = window, qk_norm
        # head_dim defaults to d_model / n_heads; published models may pick another (Gemma, Qwen3).
        head_dim = d_model // n_heads if head_dim is None else head_dim
        # One fused matmul for q (n_heads) then k and v (n_kv_heads each): 3 * d_model wide for MHA.
        qkv_width = (n_heads + 2 * self.n_kv_heads) * head_dim
        qkv_bias = use_bias if qkv_bias is None else qkv_bias  # Qwen2: biased q/k/v, plain out
        self.qkv = Linear(d_model, qkv_width, use_bias=qkv_bias, init_std=init_std, key=qkv_key)
        self.out = Linear(n_heads * head_dim, d_model, use_bias=use_bias, init_std=out_init_std,
                          key=out_key)
        if qk_norm is not None:
            heads = (1, 1) if qk_norm == "head" else (n_heads, self.n_kv_heads)
            self.q_norm, self.k_norm = (RMSNorm(h * head_dim, eps=qk_norm_eps) for h in heads)
        self.attn_dropout = eqx.nn.Dropout(dropout)
        self.resid_dropout = eqx.nn.Dropout(dropout)

    def __check_init__(self):
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}; choose a "
                "divisor of n_heads (1 is multi-query attention, n_heads or None plain multi-head)"
            )
        check_window(self.window)

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
        qkv_key, out_key = projection_keys(key, 2)
        q, k, v = self._heads(x, qkv_key)
        return self._attend(q, k, v, positions, positions, key, out_key)

    def init_cache(self, size: int) -> KVCache:
        """An empty cache for `size` positions: `min(window, size)` slots with a window, so its
        memory and each step's reads stop growing at the window."""
        slots = size if self.window is None else min(self.window, size)
        return KVCache.empty(slots, self.n_kv_heads, self.head_dim, self.out.weight.dtype)

    @typecheck
    def decode(
        self, x: Float[Array, "seq d_model"], positions: Int[Array, " seq"], cache: KVCache
    ) -> tuple[Float[Array, "seq d_model"], KVCache]:
        """Attention for one example's new positions over its cache, which they are added to.

        Keys are cached after the position hook (a rotary key depends on its own position only),
        so a step reads each cached key once and cached decoding equals the full forward. The
        new positions attend to the cache as it was and to their own keys, and are written into
        it last: reading the updated cache instead made XLA:CPU copy every layer's whole cache
        at every token. `positions` follow on from the cache's in increasing order; negative
        ones are padding, neither seen nor cached. With a window that the cache holds, more
        positions than it has slots may come at once (a long prompt): it keeps the last ones.
        """
        seq = x.shape[0]
        # A cache narrower than the window narrows it to what it holds, as a full-attention
        # cache does once it slides; only a cache that holds the window takes any prefill.
        window = cache.size if self.window is None else min(self.window, cache.size)
        if seq > cache.size and window != self.window:
            raise ValueError(f"{seq} new positions do not fit a KV cache of {cache.size}; "
                             "feed at most block_size tokens at once")
        q, k, v = self._heads(x)
        if self.positional is not None:
            q, k, _ = self.positional(q, k, positions, positions)
        # The new keys as the cache would hold them (its dtype), so decoding equals reading back.
        k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
        key_positions = cache.key_positions(positions)
        # Query heads grouped by the key/value head they share: no copy of the cache per group.
        group = self.n_heads // self.n_kv_heads
        grouped = q.reshape(seq, self.n_kv_heads, group, self.head_dim)
        scores = self._cached_scores(grouped, k, cache, positions, key_positions)
        visible = cache.visible(key_positions, positions, window)
        weights = jax.nn.softmax(jnp.where(visible, scores, MASKED), axis=-1)
        past, new = weights[..., : cache.size], weights[..., cache.size:]
        y = (einsum_f32("kgqs,kds->qkgd", past.astype(v.dtype), cache.v)
             + einsum_f32("kgqs,skd->qkgd", new.astype(v.dtype), v))
        # The cache is written after it is read (gptzoo.workarounds.read_before_write).
        k, v, positions = read_before_write(y, k, v, positions)
        return self.out(y.reshape(seq, -1).astype(x.dtype)), cache.update(k, v, positions)

    def _cached_scores(self, grouped, k, cache, positions, key_positions):
        """Scores `(kv_heads, group, seq, cache.size + seq)` of the grouped queries over the
        cache's keys then the new ones, in float32 as in `attention_weights`, whatever the
        cache's dtype."""
        scores = jnp.concatenate([einsum_f32("qkgd,ksd->kgqs", grouped, cache.k),
                                  einsum_f32("qkgd,skd->kgqs", grouped, k)], axis=-1)
        scores = scores / math.sqrt(self.head_dim)
        if self.positional is None:
            return scores
        # A bias (ALiBi) depends on the positions alone: the keys passed are placeholders,
        # and a hook that returns no bias (rotary) is compiled away.
        q = grouped.reshape(grouped.shape[0], -1, self.head_dim)
        placeholder = jnp.zeros((key_positions.shape[0], *k.shape[1:]), q.dtype)
        _, _, bias = self.positional(q, placeholder, positions, key_positions)
        return scores if bias is None else scores + bias.reshape(scores.shape)

    def _heads(self, x, key=None):
        """Queries, keys and values `(..., seq, heads, head_dim)`, queries and keys normalised
        when `qk_norm` is set; `key` is the projection's (an adapter's input dropout)."""
        qkv = self.qkv(x, key=key).reshape(*x.shape[:-1], self.n_heads + 2 * self.n_kv_heads, -1)
        q, k, v = jnp.split(qkv, [self.n_heads, self.n_heads + self.n_kv_heads], axis=-2)
        return self._normed(self.q_norm, q), self._normed(self.k_norm, k), v

    def _normed(self, norm, x):
        """`x` through `norm` per head ("head") or over all its heads at once ("projection")."""
        if norm is None:
            return x
        if self.qk_norm == "head":
            return norm(x)
        return norm(x.reshape(*x.shape[:-2], -1)).reshape(x.shape)

    def _attend(self, q, k, v, q_positions, k_positions, key, out_key=None):
        *batch, seq, _, _ = q.shape
        attn_key, resid_key = jax.random.split(key) if key is not None else (None, None)
        bias = None
        if self.positional is not None:
            q, k, bias = self.positional(q, k, q_positions, k_positions)
        y = causal_attend(q, k, v, bias, window=self.window, dropout=self.attn_dropout,
                          key=attn_key)
        return self.resid_dropout(self.out(y.reshape(*batch, seq, -1), key=out_key),
                                  key=resid_key, inference=key is None)
