import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from gptzoo.nn._typecheck import typecheck
from gptzoo.nn.activation import GATE_ACTIVATIONS, gated
from gptzoo.nn.linear import Linear, projection_keys


def llama_hidden_dim(d_model: int, hidden_mult: float = 4, multiple_of: int = 256) -> int:
    """LLaMA's gated hidden width: 2/3 of `hidden_mult * d_model` (so the three matrices of a GLU
    hold as many parameters as a plain MLP's two), rounded up to a multiple of `multiple_of`."""
    if multiple_of < 1:
        raise ValueError(f"multiple_of={multiple_of} must be a positive integer; pass e.g. 32")
    hidden = int(2 * hidden_mult * d_model / 3)
    return multiple_of * -(-hidden // multiple_of)


class GLUMLP(eqx.Module):
    """Gated feed-forward (Shazeer 2020): `down(act(gate(x)) * up(x))`, then dropout.

    `activation="silu"` is SwiGLU (LLaMA), `"gelu"` is GEGLU. The hidden width is `d_hidden`,
    by default `llama_hidden_dim(d_model, hidden_mult, multiple_of)`. `gate` and `up` are one
    fused matmul (`gate_up`, gate in the first half of its outputs), split afterwards.
    """

    gate_up: Linear
    down: Linear
    dropout: eqx.nn.Dropout
    activation: str = eqx.field(static=True)

    def __init__(
        self, d_model: int, *, activation: str = "silu", hidden_mult: float = 4,
        multiple_of: int = 256, d_hidden: int | None = None, dropout: float = 0.0,
        use_bias: bool = True, init_std: float = 0.02, out_init_std: float = 0.02,
        key: PRNGKeyArray,
    ):
        gate_up_key, down_key = jax.random.split(key)
        if d_hidden is None:
            d_hidden = llama_hidden_dim(d_model, hidden_mult, multiple_of)
        self.activation = activation
        self.gate_up = Linear(d_model, 2 * d_hidden, use_bias=use_bias, init_std=init_std,
                              key=gate_up_key)
        self.down = Linear(d_hidden, d_model, use_bias=use_bias, init_std=out_init_std,
                           key=down_key)
        self.dropout = eqx.nn.Dropout(dropout)

    def __check_init__(self):
        if self.activation not in GATE_ACTIVATIONS:
            raise ValueError(
                f"GLUMLP activation={self.activation!r} is unknown; choose 'silu' (SwiGLU) or "
                "'gelu' (GEGLU)"
            )

    @typecheck
    def __call__(
        self, x: Float[Array, "*batch seq d_model"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch seq d_model"]:
        gate_up_key, down_key = projection_keys(key, 2)
        gate, up = jnp.split(self.gate_up(x, key=gate_up_key), 2, axis=-1)
        h = gated(gate, up, self.activation)
        return self.dropout(self.down(h, key=down_key), key=key, inference=key is None)
