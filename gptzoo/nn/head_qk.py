import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from gptzoo.nn._typecheck import typecheck
from gptzoo.nn.attention import causal_mask
from gptzoo.nn.decoding import MixesPositions
from gptzoo.nn.linear import Linear


class HeadQK(MixesPositions):
    """The head-QK trick (BlinkDL, RWKV): extra logits that learn to copy or avoid earlier tokens.

    `c = causal(q(x) k(x)^T / d_qk)`, `logits_extra = c @ one_hot(tokens, vocab)`: position i adds
    `c[i, j]` to the logit of the token seen at each position j <= i. Added to the head's logits
    on the final-norm output. `q` starts at zero (as in RWKV-4), so the extra logits start at zero.
    It reads every earlier token, so it is a `MixesPositions`: no KV-cache decoding.
    """

    q: Linear
    k: Linear
    vocab_size: int = eqx.field(static=True)

    def __init__(self, d_model: int, vocab_size: int, *, d_qk: int = 256, init_std: float = 0.02,
                 key: PRNGKeyArray):
        q_key, k_key = jax.random.split(key)
        self.q = Linear(d_model, d_qk, use_bias=False, init_std=0.0, key=q_key)
        self.k = Linear(d_model, d_qk, use_bias=False, init_std=init_std, key=k_key)
        self.vocab_size = vocab_size

    @typecheck
    def __call__(
        self, x: Float[Array, "*batch seq d_model"], tokens: Int[Array, "*batch seq"]
    ) -> Float[Array, "*batch seq vocab"]:
        seq, d_qk = x.shape[-2], self.q.weight.shape[1]
        scores = jnp.einsum("...id,...jd->...ij", self.q(x), self.k(x)) / d_qk
        scores = jnp.where(causal_mask(seq, seq), scores, 0.0)
        return scores @ jax.nn.one_hot(tokens, self.vocab_size, dtype=x.dtype)
