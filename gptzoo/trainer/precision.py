"""Mixed precision: float32 master weights and optimizer state, compute in `trainer.precision`.

The floating parameters are cast to the compute dtype inside the differentiated loss, so the
forward and backward run in that dtype while the gradients arrive in float32 on the master
weights (the cast's transpose casts them back). The components keep softmax, norm statistics,
logits and the loss in float32 themselves (see docs/precision-and-batches.md).
"""

import equinox as eqx
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def in_compute_dtype(params, precision: str):
    """`params` with every floating array leaf cast to `precision`'s dtype ("float32" is a no-op,
    so a float32 run is bit-identical to one without a policy)."""
    dtype = DTYPES[precision]
    if dtype == jnp.float32:
        return params

    def cast(leaf):
        floating = eqx.is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating)
        return leaf.astype(dtype) if floating else leaf

    return jax.tree.map(cast, params)
