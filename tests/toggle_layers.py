"""What test_toggles.py and test_toggles_in_models.py share: the small sizes (width D, H heads of
HD channels) and self-attention (bare, rotary or ALiBi) with every array redrawn at random."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gptzoo import nn

D, H, HD = 16, 4, 4


def randomized(module, seed, scale=0.3):
    """Every array of `module` redrawn from N(0, scale^2) (NumPy's draws: each new shape
    jax.random compiles costs ~1 s), so biases, norm scales and identity inits all take part."""
    params, static = eqx.partition(module, eqx.is_array)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype) for a in leaves]
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)


POSITIONAL = {None: None, "rotary": lambda: nn.Rotary(HD), "alibi": lambda: nn.ALiBi(H)}


def self_attention(positional=None, n_kv_heads=None, seed=0):
    make = POSITIONAL[positional]
    return nn.CausalSelfAttention(D, H, n_kv_heads=n_kv_heads,
                                  positional=None if make is None else make(),
                                  key=jax.random.PRNGKey(seed))
