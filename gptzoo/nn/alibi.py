import math

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from gptzoo.nn._typecheck import typecheck


def alibi_slopes(n_heads: int) -> np.ndarray:
    """ALiBi's head slopes: `2^(-8k/n)` for k = 1..n when n is a power of two; otherwise those of
    the power of two p just below n, then every other slope of 2p (as the paper's code does)."""
    def geometric(n: int) -> np.ndarray:
        return 2.0 ** (-8.0 * np.arange(1, n + 1) / n)

    p = 2 ** math.floor(math.log2(n_heads))
    return np.concatenate([geometric(p), geometric(2 * p)[0::2][:n_heads - p]])


class ALiBi(eqx.Module):
    """Attention with Linear Biases (Press et al. 2022): a position hook for attention.

    Adds `-slope_h * (i - j)` to head h's score of the query at position i for the key at position
    j (keys after the query are masked anyway), with `alibi_slopes(n_heads)`. q and k pass
    through unchanged, and the model needs no position embedding, so it runs past its training
    length.
    """

    n_heads: int = eqx.field(static=True)

    def __check_init__(self):
        if self.n_heads < 1:
            raise ValueError(f"ALiBi n_heads={self.n_heads} must be a positive integer; pass the "
                             "attention's n_heads")

    @typecheck
    def __call__(
        self, q: Float[Array, "*batch q heads head_dim"],
        k: Float[Array, "*batch k kv_heads head_dim"],
        q_positions: Int[Array, " q"], k_positions: Int[Array, " k"],
    ) -> tuple[Float[Array, "*batch q heads head_dim"], Float[Array, "*batch k kv_heads head_dim"],
               Float[Array, "heads q k"]]:
        if q.shape[-2] != self.n_heads:
            raise ValueError(f"ALiBi built for n_heads={self.n_heads} got {q.shape[-2]} query "
                             "heads; build it with the attention's n_heads")
        distance = (q_positions[:, None] - k_positions[None, :]).astype(jnp.float32)
        slopes = jnp.asarray(alibi_slopes(self.n_heads), dtype=jnp.float32)
        # Computed in float32, returned in q's dtype: a float32 bias added to bfloat16 scores
        # would silently promote the attention (and everything after it) to float32.
        return q, k, (-slopes[:, None, None] * distance).astype(q.dtype)
