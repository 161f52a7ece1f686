import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from gptzoo.nn._typecheck import typecheck
from gptzoo.nn.kv_cache import KVCache
from gptzoo.nn.linear import Linear, projection_keys


@typecheck
def causal_mask(n_queries: int, n_keys: int) -> Bool[Array, "q k"]:
    """Query i (the i-th of the last `n_queries` positions) may see keys up to its own position."""
    offset = n_keys - n_queries
    return jnp.arange(n_queries)[:, None] + offset >= jnp.arange(n_keys)[None, :]


# Query block size of the block-causal path: query block i reads keys up to its own last position
# only, skipping the masked upper triangle (5/8 of the matrix products at 4 blocks).
BLOCK = 64
# Measured on the 2-core CPU (process CPU ms, forward + backward of one layer's attention, medians,
# other jobs sharing the cores): batch 8, 256 positions, 6 heads of 64: einsum 87, blocks of 64
# 64, of 32 81, of 128 71, `jax.nn.dot_product_attention`'s XLA path 97; batch 12, 64 positions,
# 4 heads of 32: einsum 4.3, blocks of 32 4.8, of 16 3.5 (noise at that size). So blocks of 64
# from 2 blocks up, the einsum (one block) below.
MIN_BLOCKED_QUERIES = 2 * BLOCK


def attention_path(platform: str, dtype, *, n_queries: int, n_keys: int, bias: bool,
                   dropout: bool) -> str:
    """Which implementation `causal_attend` uses: "cudnn", "blocks" or "einsum".

    **Arguments:**

    - `platform`: `jax.default_backend()` ("cpu", "gpu", "tpu").
    - `dtype`: the queries' dtype.
    - `n_queries`, `n_keys`: query and key lengths (the queries are the last keys' positions).
    - `bias`, `dropout`: whether a score bias is added, whether attention dropout is active.

    cuDNN's fused kernel runs half precision only, and its `is_causal` mask is aligned to the
    first key, so it takes no bias, no dropout and no fewer queries than keys (Perceiver AR).
    """
    if (platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and not bias
            and not dropout and n_queries == n_keys):
        return "cudnn"
    if platform == "cpu" and n_queries >= MIN_BLOCKED_QUERIES:
        return "blocks"
    return "einsum"


def _einsum_f32(spec: str, a: Array, b: Array) -> Array:
    """`jnp.einsum` accumulated and returned in float32. XLA:CPU has no bfloat16 x bfloat16 ->
    float32 dot ("Unsupported element type for DotThunk"), so there the operands are upcast."""
    if jax.default_backend() == "cpu":
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@typecheck
def attention_weights(
    q: Float[Array, "*batch q heads head_dim"],
    k: Float[Array, "*batch k heads head_dim"],
    mask: Bool[Array, "q k"],
    bias: Float[Array, "heads q k"] | None = None,
) -> Float[Array, "*batch heads q k"]:
    """softmax(q k^T / sqrt(head_dim) + bias) over the keys each query may see, in float32
    whatever the inputs' dtype (bfloat16 scores lose the small weights)."""
    return _weights(_heads_first(q), _heads_first(k), mask, bias)


def _heads_first(x: Array) -> Array:
    """`(..., seq, heads, head_dim)` <-> `(..., heads, seq, head_dim)`."""
    return jnp.swapaxes(x, -3, -2)


# The two products below take heads-first operands, each head's rows contiguous: transposing
# q, k and v once before them (and the output once after), rather than leaving XLA a transpose
# per product and block, took a layer's block-causal attention forward + backward from 40.4 and
# 43.8 to 37.6 and 35.1 ms (2-core CPU, batch 8, 256 positions, 6 heads of 64; two alternating
# runs of bench_train.py's attention_micro, medians of 12).
def _weights(q, k, mask, bias):
    scores = _einsum_f32("...hqd,...hkd->...hqk", q, k) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    return jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)


def _weighted_values(weights, v):
    """`weights @ v` with the weights in v's dtype (as flash attention does), accumulated in
    float32 and returned in v's dtype."""
    return _einsum_f32("...hqk,...hkd->...hqd", weights.astype(v.dtype), v).astype(v.dtype)


@typecheck
def attend(
    q: Float[Array, "*batch q heads head_dim"],
    k: Float[Array, "*batch k heads head_dim"],
    v: Float[Array, "*batch k heads head_dim"],
    mask: Bool[Array, "q k"],
    bias: Float[Array, "heads q k"] | None = None,
) -> Float[Array, "*batch q heads head_dim"]:
    """Scaled dot-product attention under any mask."""
    return _heads_first(_weighted_values(attention_weights(q, k, mask, bias), _heads_first(v)))


@typecheck
def causal_attend(
    q: Float[Array, "*batch q heads head_dim"],
    k: Float[Array, "*batch k kv_heads head_dim"],
    v: Float[Array, "*batch k kv_heads head_dim"],
    bias: Float[Array, "heads q k"] | None = None,
    *, dropout: eqx.nn.Dropout | None = None, key: PRNGKeyArray | None = None,
) -> Float[Array, "*batch q heads head_dim"]:
    """Causal attention of the last `q` positions over all `k`, on the path `attention_path` picks.

    **Arguments:**

    - `q`, `k`, `v`: queries and keys/values; each run of `heads // kv_heads` query heads shares
        one key/value head (grouped-query attention).
    - `bias`: added to the scores (ALiBi), or None.
    - `dropout`, `key`: dropout on the attention weights, active when `key` is given.
    """
    n_queries, n_keys = q.shape[-3], k.shape[-3]
    dropping = dropout is not None and dropout.p > 0 and key is not None
    path = attention_path(jax.default_backend(), q.dtype, n_queries=n_queries, n_keys=n_keys,
                          bias=bias is not None, dropout=dropping)
    if path == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    # Repeating the shared k/v heads measured faster on CPU than a grouped einsum that avoids
    # the copy, and is a no-op for plain multi-head attention.
    k, v = (jnp.repeat(a, q.shape[-2] // k.shape[-2], axis=-2) for a in (k, v))
    q, k, v = map(_heads_first, (q, k, v))
    block = BLOCK if path == "blocks" else n_queries
    starts = range(0, n_queries, block)
    keys = jax.random.split(key, len(starts)) if dropping else [None] * len(starts)
    outputs = []
    for start, block_key in zip(starts, keys, strict=True):
        stop = min(start + block, n_queries)
        seen = n_keys - n_queries + stop  # keys up to this block's last query
        weights = _weights(
            q[..., start:stop, :], k[..., :seen, :], causal_mask(stop - start, seen),
            None if bias is None else bias[:, start:stop, :seen])
        if dropping:
            weights = dropout(weights, key=block_key)
        outputs.append(_weighted_values(weights, v[..., :seen, :]))
    return _heads_first(jnp.concatenate(outputs, axis=-2))


def _after(dependency: Array, *values: Array) -> tuple[Array, ...]:
    """`values` unchanged, but computed from `dependency` (plus zero): XLA runs whatever reads
    their inputs before it writes them. (`jax.lax.optimization_barrier` is removed before XLA:CPU
    orders buffers.) A non-finite `dependency` makes them garbage; its output already is."""
    zero = jnp.zeros((), dependency.dtype) * dependency.reshape(-1)[0]
    return tuple(a + zero.astype(a.dtype) for a in values)


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
        qkv_key, out_key = projection_keys(key, 2)
        q, k, v = self._heads(x, qkv_key)
        return self._attend(q, k, v, positions, positions, key, out_key)

    def init_cache(self, size: int) -> KVCache:
        return KVCache.empty(size, self.n_kv_heads, self.head_dim, self.out.weight.dtype)

    @typecheck
    def decode(
        self, x: Float[Array, "seq d_model"], positions: Int[Array, " seq"], cache: KVCache
    ) -> tuple[Float[Array, "seq d_model"], KVCache]:
        """Attention for one example's new positions over its cache, which they are added to.

        Keys are cached after the position hook (a rotary key depends on its own position only),
        so a step reads each cached key once and cached decoding equals the full forward. The
        new positions attend to the cache as it was and to their own keys, and are written into
        it last: reading the updated cache instead made XLA:CPU copy every layer's whole cache
        at every token.
        """
        seq = x.shape[0]
        q, k, v = self._heads(x)
        if self.positional is not None:
            q, k, _ = self.positional(q, k, positions, positions)
        # The new keys as the cache would hold them (its dtype), so decoding equals reading back.
        k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
        key_positions = cache.key_positions(positions)
        # Query heads grouped by the key/value head they share: no copy of the cache per group.
        group = self.n_heads // self.n_kv_heads
        grouped = q.reshape(seq, self.n_kv_heads, group, self.head_dim)
        # Scores and softmax in float32 as in `attention_weights`, whatever the cache's dtype.
        scores = jnp.concatenate([_einsum_f32("qkgd,ksd->kgqs", grouped, cache.k),
                                  _einsum_f32("qkgd,skd->kgqs", grouped, k)], axis=-1)
        scores = scores / math.sqrt(self.head_dim)
        if self.positional is not None:
            # A bias (ALiBi) depends on the positions alone: the keys passed are placeholders,
            # and a hook that returns no bias (rotary) is compiled away.
            placeholder = jnp.zeros((key_positions.shape[0], *k.shape[1:]), q.dtype)
            _, _, bias = self.positional(q, placeholder, positions, key_positions)
            if bias is not None:
                scores = scores + bias.reshape(self.n_kv_heads, group, seq, -1)
        visible = cache.visible(key_positions, positions)
        weights = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
        past, new = weights[..., : cache.size], weights[..., cache.size:]
        y = (_einsum_f32("kgqs,kds->qkgd", past.astype(v.dtype), cache.v)
             + _einsum_f32("kgqs,skd->qkgd", new.astype(v.dtype), v))
        # The cache is written after it is read: the written values are made to depend on the
        # output, which orders the reads before the in-place update. Unordered, XLA:CPU copies
        # every layer's whole cache at every token to keep the reads safe.
        k, v, positions = _after(y, k, v, positions)
        return self.out(y.reshape(seq, -1).astype(x.dtype)), cache.update(k, v, positions)

    def _heads(self, x, key=None):
        qkv = self.qkv(x, key=key).reshape(*x.shape[:-1], self.n_heads + 2 * self.n_kv_heads, -1)
        return jnp.split(qkv, [self.n_heads, self.n_heads + self.n_kv_heads], axis=-2)

    def _attend(self, q, k, v, q_positions, k_positions, key, out_key=None):
        *batch, seq, _, _ = q.shape
        attn_key, resid_key = jax.random.split(key) if key is not None else (None, None)
        bias = None
        if self.positional is not None:
            q, k, bias = self.positional(q, k, q_positions, k_positions)
        y = causal_attend(q, k, v, bias, dropout=self.attn_dropout, key=attn_key)
        return self.resid_dropout(self.out(y.reshape(*batch, seq, -1), key=out_key), key=resid_key,
                                  inference=key is None)
