import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from gptzoo.nn._typecheck import typecheck


class Block(eqx.Module):
    """Pre-norm residual block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`.

    `attention` and `mlp` are any modules mapping `(*batch, seq, d_model)` to the same shape with a
    keyword-only `key` for dropout, so recipes can swap in their own. `attn_out_norm` and
    `mlp_out_norm`, when given, also normalise each sublayer's output before the residual adds it,
    `x + out_norm(f(norm(x)))`: the sandwich norm of CogView (Ding et al. 2021), which keeps
    a sublayer's large outputs from swamping the residual stream.
    """

    attn_norm: eqx.Module
    attention: eqx.Module
    mlp_norm: eqx.Module
    mlp: eqx.Module
    attn_out_norm: eqx.Module | None = None
    mlp_out_norm: eqx.Module | None = None

    @typecheck
    def __call__(
        self, x: Float[Array, "*batch seq d_model"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch seq d_model"]:
        attn_key, mlp_key = jax.random.split(key) if key is not None else (None, None)
        x = x + _normed(self.attn_out_norm, self.attention(self.attn_norm(x), key=attn_key))
        return x + _normed(self.mlp_out_norm, self.mlp(self.mlp_norm(x), key=mlp_key))

    def init_cache(self, block_size: int):
        """Its attention's KV cache for `block_size` positions (`nn.decoding.CachedBlock`)."""
        return self.attention.init_cache(block_size)

    def decode(self, x: Float[Array, "seq d_model"], positions, cache):
        """`__call__` for one example's new positions, reading and extending its KV cache."""
        y, cache = self.attention.decode(self.attn_norm(x), positions, cache)
        x = x + _normed(self.attn_out_norm, y)
        return x + _normed(self.mlp_out_norm, self.mlp(self.mlp_norm(x))), cache


def _normed(norm: eqx.Module | None, y: Array) -> Array:
    return y if norm is None else norm(y)
