import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from gptzoo.nn._typecheck import typecheck
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
) -> Float[Array, "*batch heads q k"]:
    """softmax(q k^T / sqrt(head_dim)) over the keys each query may see."""
    scores = jnp.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(q.shape[-1])
    return jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)


@typecheck
def attend(
    q: Float[Array, "*batch q heads head_dim"],
    k: Float[Array, "*batch k heads head_dim"],
    v: Float[Array, "*batch k heads head_dim"],
    mask: Bool[Array, "q k"],
) -> Float[Array, "*batch q heads head_dim"]:
    """Scaled dot-product attention."""
    return jnp.einsum("...hqk,...khd->...qhd", attention_weights(q, k, mask), v)


class CausalSelfAttention(eqx.Module):
    """Multi-head causal self-attention (GPT-2), written with `jnp.einsum`."""

    qkv: Linear
    out: Linear
    attn_dropout: eqx.nn.Dropout
    resid_dropout: eqx.nn.Dropout
    n_heads: int = eqx.field(static=True)

    def __init__(
        self, d_model: int, n_heads: int, *, dropout: float = 0.0, use_bias: bool = True,
        init_std: float = 0.02, out_init_std: float = 0.02, key: PRNGKeyArray,
    ):
        qkv_key, out_key = jax.random.split(key)
        self.n_heads = n_heads
        self.qkv = Linear(d_model, 3 * d_model, use_bias=use_bias, init_std=init_std, key=qkv_key)
        self.out = Linear(d_model, d_model, use_bias=use_bias, init_std=out_init_std, key=out_key)
        self.attn_dropout = eqx.nn.Dropout(dropout)
        self.resid_dropout = eqx.nn.Dropout(dropout)

    def __check_init__(self):
        d_model = self.out.weight.shape[0]
        if d_model % self.n_heads:
            raise ValueError(
                f"d_model={d_model} is not divisible by n_heads={self.n_heads}; "
                "choose n_heads that divides d_model"
            )

    @typecheck
    def __call__(
        self, x: Float[Array, "*batch seq d_model"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch seq d_model"]:
        *batch, seq, d_model = x.shape
        attn_key, resid_key = jax.random.split(key) if key is not None else (None, None)
        qkv = self.qkv(x).reshape(*batch, seq, 3 * self.n_heads, d_model // self.n_heads)
        q, k, v = jnp.split(qkv, 3, axis=-2)
        weights = attention_weights(q, k, causal_mask(seq, seq))
        weights = self.attn_dropout(weights, key=attn_key, inference=key is None)
        y = jnp.einsum("...hqk,...khd->...qhd", weights, v).reshape(*batch, seq, d_model)
        return self.resid_dropout(self.out(y), key=resid_key, inference=key is None)
