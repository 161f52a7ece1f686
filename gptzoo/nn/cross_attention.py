import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from gptzoo.nn._typecheck import typecheck
from gptzoo.nn.attention import causal_attend
from gptzoo.nn.linear import Linear, projection_keys
from gptzoo.nn.norm import LayerNorm


class CausalCrossAttention(eqx.Module):
    """Perceiver AR's causal cross-attention (Hawthorne et al. 2022): `n` latents, the queries, are
    the last `n` positions of a `seq`-long context, and latent i (at position `seq - n + i`)
    attends to every context position up to its own, its own included.

    `attend(query_norm(latents) W_q, context_norm(context) W_k, context_norm(context) W_v) W_o`:
    queries and context get separate LayerNorms, as in the paper. The residual is the caller's.
    """

    query_norm: LayerNorm
    context_norm: LayerNorm
    q: Linear
    kv: Linear
    out: Linear
    attn_dropout: eqx.nn.Dropout
    resid_dropout: eqx.nn.Dropout
    n_heads: int = eqx.field(static=True)

    def __init__(
        self, d_model: int, n_heads: int, *, dropout: float = 0.0, use_bias: bool = True,
        init_std: float = 0.02, out_init_std: float = 0.02, key: PRNGKeyArray,
    ):
        q_key, kv_key, out_key = jax.random.split(key, 3)
        self.n_heads = n_heads
        self.query_norm = LayerNorm(d_model, use_bias=use_bias)
        self.context_norm = LayerNorm(d_model, use_bias=use_bias)
        self.q = Linear(d_model, d_model, use_bias=use_bias, init_std=init_std, key=q_key)
        # Keys and values in one matmul over the long context, where the cost is.
        self.kv = Linear(d_model, 2 * d_model, use_bias=use_bias, init_std=init_std, key=kv_key)
        self.out = Linear(d_model, d_model, use_bias=use_bias, init_std=out_init_std, key=out_key)
        self.attn_dropout = eqx.nn.Dropout(dropout)
        self.resid_dropout = eqx.nn.Dropout(dropout)

    def __check_init__(self):
        d_model = self.out.weight.shape[0]
        if d_model % self.n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={self.n_heads}; "
                             "choose n_heads that divides d_model")

    @typecheck
    def __call__(
        self, latents: Float[Array, "*batch latents d_model"],
        context: Float[Array, "*batch seq d_model"], *, key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch latents d_model"]:
        n_latents, seq = latents.shape[-2], context.shape[-2]
        if n_latents > seq:
            raise ValueError(f"{n_latents} latents exceed the context of {seq} positions they are "
                             "the last of; pass at most seq latents")
        attn_key, resid_key = jax.random.split(key) if key is not None else (None, None)
        q_key, kv_key, out_key = projection_keys(key, 3)
        q = self.q(self.query_norm(latents), key=q_key).reshape(*latents.shape[:-1], self.n_heads,
                                                                 -1)
        kv = self.kv(self.context_norm(context), key=kv_key).reshape(*context.shape[:-1],
                                                                      2 * self.n_heads, -1)
        k, v = jnp.split(kv, 2, axis=-2)
        y = causal_attend(q, k, v, dropout=self.attn_dropout, key=attn_key).reshape(latents.shape)
        return self.resid_dropout(self.out(y, key=out_key), key=resid_key, inference=key is None)
