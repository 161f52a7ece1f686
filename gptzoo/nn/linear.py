import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from gptzoo.nn._typecheck import typecheck


class Linear(eqx.Module):
    """`x @ weight + bias`, with the weight stored `(in, out)` so a batch of rows is one plain matmul."""

    weight: Float[Array, "d_in d_out"]
    bias: Float[Array, " d_out"] | None

    def __init__(
        self, d_in: int, d_out: int, *, use_bias: bool = True, init_std: float = 0.02,
        key: PRNGKeyArray,
    ):
        self.weight = init_std * jax.random.normal(key, (d_in, d_out))
        self.bias = jax.numpy.zeros(d_out) if use_bias else None

    @typecheck
    def __call__(self, x: Float[Array, "*rows d_in"]) -> Float[Array, "*rows d_out"]:
        y = x @ self.weight
        return y if self.bias is None else y + self.bias
