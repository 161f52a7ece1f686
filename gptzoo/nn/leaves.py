"""Which leaves of a module are its arrays, when the module may be abstract: built under
`eqx.filter_eval_shape`, its arrays are `jax.ShapeDtypeStruct`s."""

import equinox as eqx
import jax


def is_array_or_shape(x) -> bool:
    """An array, or the shape and dtype of one (`jax.ShapeDtypeStruct`)."""
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)
