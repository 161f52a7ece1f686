from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from gptzoo.nn._typecheck import typecheck


class Linear(eqx.Module):
    """`x @ weight + bias` over any leading dimensions.

    The weight is stored `(in, out)` and the input flattened to 2-D first: on CPU one plain
    `(rows, in) @ (in, out)` matmul trains faster than the batched form that `vmap` over
    examples produces (docs/benchmarks.md).
    """

    weight: Float[Array, "d_in d_out"]
    bias: Float[Array, " d_out"] | None

    def __init__(
        self, d_in: int, d_out: int, *, use_bias: bool = True, init_std: float = 0.02,
        key: PRNGKeyArray,
    ):
        self.weight = init_std * jax.random.normal(key, (d_in, d_out))
        self.bias = jax.numpy.zeros(d_out) if use_bias else None

    def __call__(self, x: Float[Array, "*rows d_in"], *, key: PRNGKeyArray | None = None,
                 out_dtype=None) -> Float[Array, "*rows d_out"]:
        """`out_dtype` (e.g. float32 for logits from bfloat16 inputs): the matmul accumulates and
        returns that dtype instead of the inputs'. `key` is unused: projections share one call,
        and an adapted one (`LoRALinear`) drops out its input with it."""
        return affine(x, self.weight, self.bias, out_dtype)


@typecheck
def affine(
    x: Float[Array, "*rows d_in"], weight: Float[Array, "d_in d_out"],
    bias: Float[Array, " d_out"] | None, out_dtype=None,
) -> Float[Array, "*rows d_out"]:
    # A function of the weights too, so a mismatched input names the dimension d_in.
    y = matmul(x.reshape(-1, x.shape[-1]), weight, out_dtype)
    y = y.reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


def matmul(x: Float[Array, "rows d_in"], w: Float[Array, "d_in d_out"], out_dtype=None
           ) -> Float[Array, "rows d_out"]:
    """`x @ w`, accumulated and returned in `out_dtype` (default: the inputs' dtype).

    When `out_dtype` is wider than the inputs (float32 logits from bfloat16 activations), the
    backward still multiplies in the inputs' dtype: the cotangent is cast down before its two
    products, as mixed-precision training does. Left to autodiff, the float32 cotangent would
    promote both to float32 products, a sizeable part of a bf16 step on a GPU.
    """
    if out_dtype is None or jnp.dtype(out_dtype) == jnp.result_type(x, w):
        return jnp.matmul(x, w, preferred_element_type=out_dtype)
    return _widening_matmul(x, w, jnp.dtype(out_dtype))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _widening_matmul(x, w, out_dtype):
    return jnp.matmul(x, w, preferred_element_type=out_dtype)


def _widening_matmul_forward(x, w, out_dtype):
    return _widening_matmul(x, w, out_dtype), (x, w)


def _widening_matmul_backward(out_dtype, saved, cotangent):
    x, w = saved
    cotangent = cotangent.astype(jnp.result_type(x, w))
    # Accumulated in float32 like the forward, returned in each input's dtype.
    return (jnp.matmul(cotangent, w.T, preferred_element_type=jnp.float32).astype(x.dtype),
            jnp.matmul(x.T, cotangent, preferred_element_type=jnp.float32).astype(w.dtype))


_widening_matmul.defvjp(_widening_matmul_forward, _widening_matmul_backward)


def projection_keys(key: PRNGKeyArray | None, n: int) -> list[PRNGKeyArray | None]:
    """Dropout keys for the `n` projections of a module that draws its own dropout from `key`
    (`LoRALinear`'s input dropout): split from `fold_in(key, 1)`, so the module's other random
    draws stay as they were. `n` Nones without a key (inference)."""
    if key is None:
        return [None] * n
    return list(jax.random.split(jax.random.fold_in(key, 1), n))
