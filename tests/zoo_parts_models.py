"""Helpers shared by the zoo-part tests (test_zoo_parts_layers.py, test_zoo_parts_gpts.py): `f64`,
`randomize` (every array of a module redrawn, so zero-init weights take part in the comparisons)
and the input `X`."""

import equinox as eqx
import jax
import numpy as np


def f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def randomize(module, key, scale=0.5):
    """Every array of `module` redrawn from N(0, scale^2), so biases, scales and zero-init
    weights take part in the comparisons."""
    params, static = eqx.partition(module, eqx.is_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    leaves = [scale * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves, strict=True)]
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)


X = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 16))
