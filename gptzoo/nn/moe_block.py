import equinox as eqx
import jax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from gptzoo.nn._typecheck import typecheck
from gptzoo.nn.moe import MoEMLP, RouterStats


class MoEBlock(eqx.Module):
    """Pre-norm residual block around a mixture of experts (Mixtral's decoder layer):
    `x + attn(norm1(x))`, then `x + moe(norm2(x))`.

    **Arguments:**

    - `attn_norm`, `mlp_norm`: the norms before attention and before the experts.
    - `attention`: self-attention, as in `Block`.
    - `mlp`: a `MoEMLP`.

    Its call returns the router's `RouterStats` alongside `x`; `Stack` and `run_blocks` sum them
    over the layers, ready for `load_balancing_loss`.
    """

    attn_norm: eqx.Module
    attention: eqx.Module
    mlp_norm: eqx.Module
    mlp: MoEMLP

    @typecheck
    def __call__(
        self, x: Float[Array, "*batch seq d_model"], *, key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, "*batch seq d_model"], RouterStats]:
        attn_key, mlp_key = jax.random.split(key) if key is not None else (None, None)
        x = x + self.attention(self.attn_norm(x), key=attn_key)
        y, stats = self.mlp(self.mlp_norm(x), key=mlp_key)
        return x + y, stats

    def init_cache(self, block_size: int):
        """Its attention's KV cache for `block_size` positions (`nn.decoding.CachedBlock`)."""
        return self.attention.init_cache(block_size)

    def decode(self, x: Float[Array, "seq d_model"], positions: Int[Array, " seq"], cache):
        """`__call__` for one example's new positions, reading and extending its KV cache. The
        experts run dense: a few tokens per example under the sampler's `vmap` would gather
        whole expert weights per token, where reading every expert once costs less."""
        y, cache = self.attention.decode(self.attn_norm(x), positions, cache)
        x = x + y
        y, _ = self.mlp(self.mlp_norm(x), path="dense")
        return x + y, cache
