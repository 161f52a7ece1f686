"""Weights laid out for decoding a few rows at a time on CPU.

A decode step multiplies each of a batch's rows (one token each) by every weight matrix. XLA:CPU
does that with a general matrix product built for many rows, which packs the whole weight first,
so a few rows read the weights far slower than one row does. Stored `(out, in)` and written as a
multiply and a sum over `in`, the same product is one fused reduction that XLA:CPU runs faster
for a few rows, and slower for a single row (`bench/bench_sample.py` prints both products;
docs/benchmarks.md, "Design choices"). So the sampler converts a model with `rowwise_layout` only
for batches of `MIN_ROWS` or more on CPU (`rowwise_pays`), and no more than XLA computes right.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from gptzoo.nn._typecheck import typecheck
from gptzoo.nn.embedding import Embedding
from gptzoo.nn.linear import Linear
from gptzoo.workarounds import rowwise_batch_computes_right

MIN_ROWS = 4  # fewest rows the reduction is used for: below, the matrix product is as fast


def rowwise_pays(n_rows: int) -> bool:
    """Whether a decode step of `n_rows` rows should read the rowwise layout: on CPU, from
    `MIN_ROWS` rows, up to as many as XLA computes it right for."""
    return (MIN_ROWS <= n_rows and rowwise_batch_computes_right(n_rows)
            and jax.default_backend() == "cpu")


@typecheck
def rowwise_product(
    x: Float[Array, "*rows d_in"], weight_t: Float[Array, "d_out d_in"], out_dtype=None,
) -> Float[Array, "*rows d_out"]:
    """`x @ weight_t.T`: a multiply-reduce for a single row (what each example of a vmapped decode
    step holds), a matrix product otherwise; accumulated in float32 at least, as the product is."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] == 1:
        dtype = jnp.result_type(x, weight_t)
        acc = jnp.promote_types(dtype, jnp.float32)
        y = jnp.sum(weight_t.astype(acc) * flat[0].astype(acc), axis=-1)[None]
        y = y.astype(out_dtype or dtype)
    else:
        y = jnp.matmul(flat, weight_t.T, preferred_element_type=out_dtype)
    return y.reshape(*x.shape[:-1], -1)


class RowwiseLinear(eqx.Module):
    """A `Linear` whose weight is stored `(out, in)`, applied by `rowwise_product`.

    **Arguments:**

    - `weight_t`: the `Linear`'s weight, transposed to `(out, in)`.
    - `bias`: its bias, or None.
    """

    weight_t: Float[Array, "d_out d_in"]
    bias: Float[Array, " d_out"] | None

    @property
    def weight(self) -> Float[Array, "d_in d_out"]:
        """The `(in, out)` view that components read shapes and dtypes from (free under jit)."""
        return jnp.swapaxes(self.weight_t, -1, -2)

    def __call__(self, x: Float[Array, "*rows d_in"], *, key: PRNGKeyArray | None = None,
                 out_dtype=None) -> Float[Array, "*rows d_out"]:
        """`Linear.__call__`'s signature; `key` is unused, as there (decoding drops nothing)."""
        y = rowwise_product(x, self.weight_t, out_dtype)
        return y if self.bias is None else y + self.bias


class RowwiseEmbedding(Embedding):
    """An `Embedding` whose tied head (`unembed`) is a `rowwise_product`: the table is already
    `(vocab, d_model)`, i.e. `(out, in)`.

    **Arguments:**

    - `weight`: the `Embedding`'s table, as it is.
    """

    def __init__(self, weight: Float[Array, "vocab d_model"]):
        self.weight = weight

    @typecheck
    def unembed(self, x: Float[Array, "*batch seq d_model"]) -> Float[Array, "*batch seq vocab"]:
        return rowwise_product(x, self.weight, jnp.float32)


def rowwise_layout(model):
    """`model` with every `Linear` and `Embedding` in its rowwise form: the same function, the
    weights of each `Linear` transposed (a copy; stacked layers keep their leading axis).
    Subclasses, which may compute something else, are left as they are."""
    def convert(node):
        if type(node) is Linear:
            return RowwiseLinear(jnp.swapaxes(node.weight, -1, -2), node.bias)
        if type(node) is Embedding:
            return RowwiseEmbedding(node.weight)
        return node

    return jax.tree.map(convert, model, is_leaf=lambda n: isinstance(n, (Linear, Embedding)))
