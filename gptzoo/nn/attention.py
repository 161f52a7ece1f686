"""Attention as functions of queries, keys and values: the causal (optionally banded) mask, and
`causal_attend` on the fastest path for the platform. `CausalSelfAttention` (self_attention.py)
is the module around them."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from gptzoo.nn._typecheck import typecheck


@typecheck
def causal_mask(n_queries: int, n_keys: int, window: int | None = None) -> Bool[Array, "q k"]:
    """Query i (the i-th of the last `n_queries` positions) may see keys up to its own position;
    with a `window`, only the `window` most recent of them, its own included (key j is seen by
    query i when `i - window < j <= i`, transformers' sliding-window mask)."""
    query = jnp.arange(n_queries)[:, None] + n_keys - n_queries
    key = jnp.arange(n_keys)[None, :]
    seen = key <= query
    return seen if window is None else seen & (key > query - window)


def check_window(window: int | None) -> None:
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window={window!r} must be a positive number of positions (a query "
                         "sees itself and the window - 1 before it), or None for full attention")


# Query block size of the block-causal path: query block i reads keys up to its own last position
# only, skipping the masked upper triangle (5/8 of the matrix products at 4 blocks).
BLOCK = 64
# Blocks of 64 from 2 blocks up, the einsum (one block) below: the faster of the CPU paths in
# `bench/bench_train.py`'s attention timings (docs/benchmarks.md, "Design choices").
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


def einsum_f32(spec: str, a: Array, b: Array) -> Array:
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


# The two products below take heads-first operands, each head's rows contiguous: q, k and v are
# transposed once before them (and the output once after) rather than leaving XLA a transpose per
# product and block, which is slower on CPU (docs/benchmarks.md, "Design choices").
def _weights(q, k, mask, bias):
    scores = einsum_f32("...hqd,...hkd->...hqk", q, k) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    return jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)


def _weighted_values(weights, v):
    """`weights @ v` with the weights in v's dtype (as flash attention does), accumulated in
    float32 and returned in v's dtype."""
    return einsum_f32("...hqk,...hkd->...hqd", weights.astype(v.dtype), v).astype(v.dtype)


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
    *, window: int | None = None, dropout: eqx.nn.Dropout | None = None,
    key: PRNGKeyArray | None = None,
) -> Float[Array, "*batch q heads head_dim"]:
    """Causal attention of the last `q` positions over all `k`, on the path `attention_path` picks.

    **Arguments:**

    - `q`, `k`, `v`: queries and keys/values; each run of `heads // kv_heads` query heads shares
        one key/value head (grouped-query attention).
    - `bias`: added to the scores (ALiBi), or None.
    - `window`: each query sees only the `window` most recent keys, its own included (sliding-
        window attention, `causal_mask`); None sees every earlier key.
    - `dropout`, `key`: dropout on the attention weights, active when `key` is given.

    A query block reads only the keys its queries may see, so with a window the block path's cost
    grows with `q * window`, not `q * k`.
    """
    check_window(window)
    n_queries, n_keys = q.shape[-3], k.shape[-3]
    dropping = dropout is not None and dropout.p > 0 and key is not None
    path = attention_path(jax.default_backend(), q.dtype, n_queries=n_queries, n_keys=n_keys,
                          bias=bias is not None, dropout=dropping)
    if path == "cudnn":
        # (left, right) keys around each query: `window - 1` before it, none after.
        local = None if window is None else (window - 1, 0)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local,
                                            implementation="cudnn")
    # Repeating the shared k/v heads runs faster on CPU than a grouped einsum that avoids the
    # copy, and is a no-op for plain multi-head attention.
    k, v = (jnp.repeat(a, q.shape[-2] // k.shape[-2], axis=-2) for a in (k, v))
    q, k, v = map(_heads_first, (q, k, v))
    blocks = _query_blocks(n_queries, n_keys, BLOCK if path == "blocks" else n_queries, window)
    masks = None
    if dropping:  # each block's kept weights scaled by 1 / (1 - p), the others 0
        keys = jax.random.split(key, len(blocks))
        masks = [dropout(jnp.ones((*q.shape[:-2], stop - start, seen - first)), key=block_key)
                 for (start, stop, first, seen), block_key in zip(blocks, keys, strict=True)]
    attend_blocks = _block_attend if path == "blocks" else _attend_blocks
    return _heads_first(attend_blocks(q, k, v, bias, masks, tuple(blocks), window))


def _query_blocks(n_queries: int, n_keys: int, block: int, window: int | None) -> list[tuple]:
    """`(start, stop, first, seen)` of each block of `block` queries: its queries
    `[start, stop)` and the keys `[first, seen)` they may see, from the window's start for its
    first query (the last `n_queries` positions) to its last query."""
    offset, blocks = n_keys - n_queries, []
    for start in range(0, n_queries, block):
        stop = min(start + block, n_queries)
        first = 0 if window is None else max(0, offset + start - window + 1)
        blocks.append((start, stop, first, offset + stop))
    return blocks


def _block_weights(q, k, bias, start, stop, first, seen, window):
    """The attention weights of queries `[start, stop)` over keys `[first, seen)`."""
    return _weights(q[..., start:stop, :], k[..., first:seen, :],
                    causal_mask(stop - start, seen - first, window),
                    None if bias is None else bias[:, start:stop, first:seen])


def _attend_blocks(q, k, v, bias, masks, blocks, window):
    """Heads-first attention block by block (dropout `masks` applied to the weights), each
    block's output the weighted values of the keys it may see."""
    outputs = []
    for i, (start, stop, first, seen) in enumerate(blocks):
        weights = _block_weights(q, k, bias, start, stop, first, seen, window)
        weights = weights if masks is None else weights * masks[i]
        outputs.append(_weighted_values(weights, v[..., first:seen, :]))
    return jnp.concatenate(outputs, axis=-2)


# The block path's gradients come from `_block_backward` rather than autodiff, which keeps every
# block's weights and adds each block's key and value gradients into a zero-padded copy of all
# the keys. Recomputing the weights and adding in place into the keys each block read is faster,
# the more so the narrower the window (bench/bench_window.py), and keeps no weights.
_block_attend = jax.custom_vjp(_attend_blocks, nondiff_argnums=(5, 6))


def _block_forward(q, k, v, bias, masks, blocks, window):
    return _attend_blocks(q, k, v, bias, masks, blocks, window), (q, k, v, bias, masks)


def _block_backward(blocks, window, residuals, d_out):
    """The gradients of `_attend_blocks` with respect to q, k, v and bias, block by block, in
    float32 and returned in the inputs' dtypes. Softmax's: `ds = p * (dp - sum(dp * p))`."""
    q, k, v, bias, masks = residuals
    scale = 1 / math.sqrt(q.shape[-1])
    dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    dbias = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
    for i, (start, stop, first, seen) in enumerate(blocks):
        weights = _block_weights(q, k, bias, start, stop, first, seen, window)
        kept = weights if masks is None else weights * masks[i]
        d_block = d_out[..., start:stop, :]
        dv = dv.at[..., first:seen, :].add(
            einsum_f32("...qk,...qd->...kd", kept.astype(v.dtype), d_block))
        d_kept = einsum_f32("...qd,...kd->...qk", d_block, v[..., first:seen, :])
        d_weights = d_kept if masks is None else d_kept * masks[i]
        d_scores = weights * (d_weights - jnp.sum(d_weights * weights, axis=-1, keepdims=True))
        dq.append(einsum_f32("...qk,...kd->...qd", d_scores, k[..., first:seen, :]) * scale)
        dk = dk.at[..., first:seen, :].add(
            einsum_f32("...qk,...qd->...kd", d_scores, q[..., start:stop, :]) * scale)
        if bias is not None:  # summed over the batch dimensions the bias is shared by
            dbias = dbias.at[:, start:stop, first:seen].add(
                d_scores.sum(axis=tuple(range(d_scores.ndim - 3))))
    return (jnp.concatenate(dq, axis=-2).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            None if bias is None else dbias.astype(bias.dtype),
            None if masks is None else [jnp.zeros_like(m) for m in masks])


_block_attend.defvjp(_block_forward, _block_backward)
