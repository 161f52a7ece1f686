import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from gptzoo.nn._typecheck import typecheck


class ParallelBlock(eqx.Module):
    """Parallel residual block: attention and MLP read the same input and their outputs are summed.

    GPT-J (Wang & Komatsuzaki 2021), one shared norm: `x + attn(norm(x)) + mlp(norm(x))`
    (`mlp_norm=None`). GPT-NeoX, two norms: `x + attn(attn_norm(x)) + mlp(mlp_norm(x))`.
    Called like `Block`; `attention` and `mlp` are any modules of the same form.
    """

    attn_norm: eqx.Module
    attention: eqx.Module
    mlp: eqx.Module
    mlp_norm: eqx.Module | None = None

    @typecheck
    def __call__(
        self, x: Float[Array, "*batch seq d_model"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch seq d_model"]:
        attn_key, mlp_key = jax.random.split(key) if key is not None else (None, None)
        attn_in = self.attn_norm(x)
        mlp_in = attn_in if self.mlp_norm is None else self.mlp_norm(x)
        return x + self.attention(attn_in, key=attn_key) + self.mlp(mlp_in, key=mlp_key)

    def init_cache(self, block_size: int):
        """Its attention's KV cache for `block_size` positions (`nn.decoding.CachedBlock`)."""
        return self.attention.init_cache(block_size)

    def decode(self, x: Float[Array, "seq d_model"], positions, cache):
        """`__call__` for one example's new positions, reading and extending its KV cache."""
        attn_in = self.attn_norm(x)
        mlp_in = attn_in if self.mlp_norm is None else self.mlp_norm(x)
        y, cache = self.attention.decode(attn_in, positions, cache)
        return x + y + self.mlp(mlp_in), cache
