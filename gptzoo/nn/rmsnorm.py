from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from gptzoo.nn._typecheck import typecheck


class RMSNorm(eqx.Module):
    """RMSNorm (Zhang & Sennrich 2019): `x / sqrt(mean(x^2) + eps) * scale` over the last axis.

    Unlike LayerNorm it neither centres nor adds a bias. `use_scale=False` drops the learned scale
    (`scale` is then None).
    """

    scale: Float[Array, " d_model"] | None
    eps: float = eqx.field(static=True)

    def __init__(self, d_model: int, *, use_scale: bool = True, eps: float = 1e-6):
        self.scale = jnp.ones(d_model) if use_scale else None
        self.eps = eps

    def __check_init__(self):
        if not self.eps > 0:
            raise ValueError(f"RMSNorm eps={self.eps} must be positive; pass e.g. eps=1e-6")

    @typecheck
    def __call__(self, x: Float[Array, "*rows d_model"]) -> Float[Array, "*rows d_model"]:
        return _rms_norm(x, self.scale, self.eps)


# Recomputed in the backward pass from its input, as `LayerNorm` is (see nn/norm.py).
@partial(jax.checkpoint, static_argnums=(2,))
def _rms_norm(x, scale, eps):
    # The mean square in float32 whatever x's dtype; the output in x's dtype.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(axis=-1, keepdims=True) + eps)
    return (y if scale is None else y * scale).astype(x.dtype)
