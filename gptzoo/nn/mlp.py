import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from gptzoo.nn._typecheck import typecheck
from gptzoo.nn.activation import gelu, relu_squared
from gptzoo.nn.linear import Linear, projection_keys

# The activations `MLP` knows by name.
MLP_ACTIVATIONS = ("gelu", "relu2")


class MLP(eqx.Module):
    """GPT-2 feed-forward: Linear -> GELU (tanh approximation) -> Linear -> dropout.

    `approximate_gelu=False` uses the exact (erf) GELU instead, as some GPT-2 configs ask.
    `activation="relu2"` uses Primer's squared ReLU, `relu(x)^2` (So et al. 2021), instead of GELU.
    """

    up: Linear
    down: Linear
    dropout: eqx.nn.Dropout
    approximate_gelu: bool = eqx.field(static=True)
    activation: str = eqx.field(static=True)

    def __init__(
        self, d_model: int, *, hidden_mult: int = 4, dropout: float = 0.0, use_bias: bool = True,
        activation: str = "gelu", approximate_gelu: bool = True, init_std: float = 0.02,
        out_init_std: float = 0.02, key: PRNGKeyArray,
    ):
        up_key, down_key = jax.random.split(key)
        d_hidden = hidden_mult * d_model
        self.up = Linear(d_model, d_hidden, use_bias=use_bias, init_std=init_std, key=up_key)
        self.down = Linear(d_hidden, d_model, use_bias=use_bias, init_std=out_init_std,
                           key=down_key)
        self.dropout = eqx.nn.Dropout(dropout)
        self.activation = activation
        self.approximate_gelu = approximate_gelu

    def __check_init__(self):
        if self.activation not in MLP_ACTIVATIONS:
            raise ValueError(f"MLP activation={self.activation!r} is not one MLP knows; choose "
                             f"one of {', '.join(map(repr, MLP_ACTIVATIONS))}")

    @typecheck
    def __call__(
        self, x: Float[Array, "*batch seq d_model"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch seq d_model"]:
        up_key, down_key = projection_keys(key, 2)
        h = self.up(x, key=up_key)
        h = relu_squared(h) if self.activation == "relu2" else gelu(h, self.approximate_gelu)
        return self.dropout(self.down(h, key=down_key), key=key, inference=key is None)
