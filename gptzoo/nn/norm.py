from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from gptzoo.nn._typecheck import typecheck


class LayerNorm(eqx.Module):
    """LayerNorm over the last axis, with optional bias (nanoGPT's `bias=False` option)."""

    weight: Float[Array, " d_model"]
    bias: Float[Array, " d_model"] | None
    eps: float = eqx.field(static=True)

    def __init__(self, d_model: int, *, use_bias: bool = True, eps: float = 1e-5):
        self.weight = jnp.ones(d_model)
        self.bias = jnp.zeros(d_model) if use_bias else None
        self.eps = eps

    def __call__(self, x: Float[Array, "*rows d_model"]) -> Float[Array, "*rows d_model"]:
        return layer_norm(x, self.weight, self.bias, self.eps)


@typecheck
def layer_norm(
    x: Float[Array, "*rows d_model"], weight: Float[Array, " d_model"],
    bias: Float[Array, " d_model"] | None, eps: float,
) -> Float[Array, "*rows d_model"]:
    # A function of the weights too, so a mismatched input names the dimension d_model.
    return _layer_norm(x, weight, bias, eps)


# Recomputed in the backward pass from its input: autodiff would otherwise keep three float32
# copies of the activations per norm (the upcast and centred input and its scaled form), six
# times a bfloat16 activation's bytes, written in the forward and read back in the backward.
# Recomputing is also faster on CPU and shrinks GPT-2 small's bf16 memory plan (docs/benchmarks.md).
@partial(jax.checkpoint, static_argnums=(3,))
def _layer_norm(x, weight, bias, eps):
    # Statistics in float32 whatever x's dtype (bfloat16 sums lose the mean); output in x's dtype.
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * weight
    return (y if bias is None else y + bias).astype(x.dtype)
