import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from gptzoo.nn._typecheck import typecheck
from gptzoo.nn.activation import gelu
from gptzoo.nn.attention import causal_mask
from gptzoo.nn.decoding import MixesPositions
from gptzoo.nn.linear import Linear, projection_keys
from gptzoo.nn.norm import LayerNorm


class SpatialGatingUnit(eqx.Module):
    """Causal Spatial Gating Unit (gMLP, Liu et al. 2021): split the channels into halves `u, v`,
    return `u * (W @ norm(v) + b)`, where `W` (block_size x block_size, lower-triangular) mixes
    positions and `b` has one entry per position.

    `W` starts near zero and `b` at one, so the unit starts as `u * 1`, a plain pass-through of `u`
    (gMLP's init). A sequence shorter than `block_size` uses the top-left `seq x seq` corner.
    """

    norm: LayerNorm
    weight: Float[Array, "block_size block_size"]
    bias: Float[Array, " block_size"]

    def __init__(self, d_hidden: int, block_size: int, *, init_scale: float = 1e-3,
                 key: PRNGKeyArray):
        # Uniform(+-init_scale / block_size) keeps W @ v near zero whatever the length, as in
        # lucidrains' g-mlp-pytorch.
        bound = init_scale / block_size
        self.norm = LayerNorm(d_hidden)
        self.weight = jax.random.uniform(key, (block_size, block_size), minval=-bound, maxval=bound)
        self.bias = jnp.ones(block_size)

    @property
    def block_size(self) -> int:
        return self.weight.shape[0]

    @typecheck
    def __call__(self, x: Float[Array, "*batch seq d_in"]) -> Float[Array, "*batch seq d_out"]:
        seq = x.shape[-2]
        if seq > self.block_size:
            raise ValueError(
                f"sequence of {seq} tokens exceeds block_size={self.block_size} of the spatial "
                "gating unit; crop the context to block_size or build it with a larger block_size"
            )
        u, v = jnp.split(x, 2, axis=-1)
        weight = jnp.where(causal_mask(seq, seq), self.weight[:seq, :seq], 0.0)
        v = jnp.einsum("ij,...jc->...ic", weight, self.norm(v)) + self.bias[:seq, None]
        return u * v


class SGUMLP(MixesPositions):
    """gMLP's feed-forward as an MLP replacement: `down(sgu(gelu(up(x))))`, then dropout.

    `up` widens to `2 * hidden_mult * d_model` channels, which the SGU halves; the default
    `hidden_mult=3` is gMLP's `d_ffn = 6 d_model`. Not a per-token map, so a `MixesPositions`:
    a model holding it is sampled without a KV cache.
    """

    up: Linear
    sgu: SpatialGatingUnit
    down: Linear
    dropout: eqx.nn.Dropout

    def __init__(
        self, d_model: int, block_size: int, *, hidden_mult: int = 3, dropout: float = 0.0,
        use_bias: bool = True, init_std: float = 0.02, out_init_std: float = 0.02,
        key: PRNGKeyArray,
    ):
        up_key, sgu_key, down_key = jax.random.split(key, 3)
        d_hidden = hidden_mult * d_model
        self.up = Linear(d_model, 2 * d_hidden, use_bias=use_bias, init_std=init_std, key=up_key)
        self.sgu = SpatialGatingUnit(d_hidden, block_size, key=sgu_key)
        self.down = Linear(d_hidden, d_model, use_bias=use_bias, init_std=out_init_std,
                           key=down_key)
        self.dropout = eqx.nn.Dropout(dropout)

    @typecheck
    def __call__(
        self, x: Float[Array, "*batch seq d_model"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch seq d_model"]:
        up_key, down_key = projection_keys(key, 2)
        h = self.sgu(gelu(self.up(x, key=up_key)))
        return self.dropout(self.down(h, key=down_key), key=key, inference=key is None)
