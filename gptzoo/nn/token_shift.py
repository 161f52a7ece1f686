import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from gptzoo.nn._typecheck import typecheck
from gptzoo.nn.decoding import MixesPositions


class TokenShift(MixesPositions):
    """Token shift (BlinkDL's time shift, RWKV; x-transformers' `shift_tokens=1`): after `norm`,
    the first `int(fraction * d_model)` channels of each position take the values of the
    position before it (zeros at the first position); the other channels stay.

    It wraps a block's input norm (`Block(attn_norm=TokenShift(LayerNorm(d)), ...)`), so the
    sublayer behind it reads `shift(norm(x))`, as x-transformers shifts the normalised input, and
    the block needs no change. Causal: a position reads itself and the one before.

    A cached decode step would need the previous position's normalised input of every sublayer,
    which the blocks' KV caches do not keep: a model with token shift is sampled by recomputing
    its context (a `MixesPositions`), as with the spatial gating unit.

    **Arguments:**

    - `norm`: the norm (any module mapping `(*batch, seq, d_model)` to the same shape) whose
        output is shifted.
    - `fraction`: the fraction of the channels shifted, in (0, 1]; x-transformers and RWKV
        shift half.
    """

    norm: eqx.Module
    fraction: float = eqx.field(static=True)

    def __init__(self, norm: eqx.Module, *, fraction: float = 0.5):
        self.norm = norm
        self.fraction = fraction

    def __check_init__(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"TokenShift fraction={self.fraction} must lie in (0, 1]; pass e.g. "
                             "0.5 to shift half the channels")

    @typecheck
    def __call__(self, x: Float[Array, "*batch seq d_model"]) -> Float[Array, "*batch seq d_model"]:
        y = self.norm(x)
        n_shifted = int(self.fraction * y.shape[-1])
        if n_shifted == 0:
            raise ValueError(f"TokenShift fraction={self.fraction} of {y.shape[-1]} channels "
                             "shifts none; pass a larger fraction")
        # Position t gets position t - 1's channels: one zero row in front, the last row dropped.
        padding = [(0, 0)] * (y.ndim - 2) + [(1, 0), (0, 0)]
        shifted = jnp.pad(y[..., :-1, :n_shifted], padding)
        return jnp.concatenate([shifted, y[..., n_shifted:]], axis=-1)
