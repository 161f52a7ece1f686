import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from gptzoo.nn._typecheck import typecheck
from gptzoo.nn.linear import matmul


class Embedding(eqx.Module):
    """Token embedding table; `unembed` reuses it as the output head when the head is tied."""

    weight: Float[Array, "vocab d_model"]

    def __init__(self, vocab_size: int, d_model: int, *, init_std: float = 0.02, key: PRNGKeyArray):
        self.weight = init_std * jax.random.normal(key, (vocab_size, d_model))

    @typecheck
    def __call__(self, tokens: Int[Array, "*batch seq"]) -> Float[Array, "*batch seq d_model"]:
        return self.weight[tokens]

    @typecheck
    def unembed(self, x: Float[Array, "*batch seq d_model"]) -> Float[Array, "*batch seq vocab"]:
        """Logits, accumulated and returned in float32 whatever the compute dtype: the softmax
        and loss over a large vocabulary need float32 logits."""
        logits = matmul(x.reshape(-1, x.shape[-1]), self.weight.T, jnp.float32)
        return logits.reshape(*x.shape[:-1], -1)


class PositionalEmbedding(eqx.Module):
    """Learned absolute positions (GPT-2). Positions past `block_size` have no embedding."""

    weight: Float[Array, "block_size d_model"]

    def __init__(self, block_size: int, d_model: int, *, init_std: float = 0.02, key: PRNGKeyArray):
        self.weight = init_std * jax.random.normal(key, (block_size, d_model))

    @property
    def block_size(self) -> int:
        return self.weight.shape[0]

    @typecheck
    def __call__(self, positions: Int[Array, " seq"]) -> Float[Array, "seq d_model"]:
        # JAX clamps out-of-range gathers silently; refuse at trace time instead.
        if positions.shape[0] > self.block_size:
            raise ValueError(
                f"sequence of {positions.shape[0]} tokens exceeds block_size={self.block_size} "
                "of the learned positional embedding; crop the context to block_size"
            )
        return self.weight[positions]
