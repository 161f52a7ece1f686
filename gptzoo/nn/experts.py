"""The experts of a mixture: stacked SwiGLU feed-forwards, and three ways to run the tokens
routed to them that compute the same.

- "dense": every expert on every token, combined with the routing weights (zero for the experts
  a token did not choose). Costs `n_experts / top_k` times the routed FLOPs: the reference.
- "ragged": the choices sorted by expert and multiplied with `jax.lax.ragged_dot`, one group per
  expert. Only TPU has a native kernel for it; XLA's CPU lowering, and by default its GPU one,
  expand it into a dense zero-padded product over every expert, more FLOPs than "dense".
- "blocks": the choices sorted by expert, each expert's run padded to whole blocks of
  `block_rows`, and every block multiplied by its expert's weights in one batched product: the
  routed FLOPs plus at most a block of padding per expert. Dropless either way: no token is
  turned away, whatever the imbalance.
"""

from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from gptzoo.nn._typecheck import typecheck
from gptzoo.nn.activation import GATE_ACTIVATIONS, gated

PATHS = ("dense", "ragged", "blocks")
# Rows per block at most, and at least for "auto" to pick "blocks": each block's product reads a
# copy of its expert's weights, so with smaller blocks copying weights outweighs multiplying and
# running every expert densely costs less.
MAX_BLOCK_ROWS = 128
MIN_BLOCK_ROWS = 16


def expert_path(path: str, n_choices: int, n_experts: int) -> str:
    """The path that `path` names for `n_choices` token-expert choices: "auto" is "ragged" on
    TPU (its native grouped product); elsewhere "blocks" when they fill blocks of at least
    `MIN_BLOCK_ROWS`, else "dense"."""
    if path != "auto":
        return path
    if jax.default_backend() == "tpu":
        return "ragged"
    return "blocks" if block_rows_for(n_choices, n_experts) >= MIN_BLOCK_ROWS else "dense"


class Experts(eqx.Module):
    """`n_experts` SwiGLU feed-forwards (Shazeer 2020), `down(act(x W_g) * x W_u)` each, held as
    weights with a leading expert axis, stored `(in, out)` as `Linear`'s are.

    **Arguments:**

    - `n_experts`: how many feed-forwards.
    - `d_model`: input and output width.
    - `d_hidden`: each expert's hidden width.
    - `activation`: "silu" (SwiGLU, Mixtral) or "gelu" (GEGLU).
    - `init_std`, `out_init_std`: standard deviations of `gate_up` and `down` at initialisation.
    - `key`: initialisation key.

    `gate_up[e]` is `[gate | up]` along its outputs, as `GLUMLP.gate_up`; no biases (Mixtral).
    """

    gate_up: Float[Array, "experts d_model two_hidden"]
    down: Float[Array, "experts d_hidden d_model"]
    activation: str = eqx.field(static=True)

    def __init__(self, n_experts: int, d_model: int, d_hidden: int, *, activation: str = "silu",
                 init_std: float = 0.02, out_init_std: float = 0.02, key: PRNGKeyArray):
        gate_up_key, down_key = jax.random.split(key)
        self.gate_up = init_std * jax.random.normal(gate_up_key, (n_experts, d_model, 2 * d_hidden))
        self.down = out_init_std * jax.random.normal(down_key, (n_experts, d_hidden, d_model))
        self.activation = activation

    def __check_init__(self):
        if self.activation not in GATE_ACTIVATIONS:
            raise ValueError(f"Experts activation={self.activation!r} is unknown; choose 'silu' "
                             "(SwiGLU) or 'gelu' (GEGLU)")

    @property
    def n_experts(self) -> int:
        return self.gate_up.shape[0]

    @typecheck
    def __call__(
        self, x: Float[Array, "rows d_model"], choices: Int[Array, "rows k"],
        weights: Float[Array, "rows k"], *, path: str = "blocks", block_rows: int | None = None,
    ) -> Float[Array, "rows d_model"]:
        """`sum_j weights[:, j] * expert_{choices[:, j]}(x)` per row, in `x`'s dtype.

        **Arguments:**

        - `x`: the tokens, one per row.
        - `choices`: each row's experts (distinct within a row).
        - `weights`: their routing weights.
        - `path`: "dense", "ragged" or "blocks" (see the module's docstring).
        - `block_rows`: rows per block of the "blocks" path; default `block_rows_for`'s.
        """
        if path not in PATHS:
            raise ValueError(f"expert path {path!r} is unknown; choose one of {', '.join(PATHS)}")
        if path == "dense":
            y, combine = self._dense(x), "erd,re->rd"
            weights = (jax.nn.one_hot(choices, self.n_experts, dtype=weights.dtype)
                       * weights[..., None]).sum(1)  # zero for the experts not chosen
        else:
            y, combine = self._grouped(x, choices, path, block_rows), "rkd,rk->rd"
        return jnp.einsum(combine, y.astype(jnp.float32), weights).astype(x.dtype)

    def _dense(self, x):
        """Every expert's output for every row, `(experts, rows, d_model)`."""
        def product(h, w):  # the input rows first, then each expert's own hidden rows
            return jnp.einsum("ri,eio->ero" if h.ndim == 2 else "eri,eio->ero", h, w)

        return self._feed_forward(x, product)

    def _grouped(self, x, choices, path: str, block_rows: int | None):
        """Each row's chosen experts' outputs, `(rows, k, d_model)`, computed grouped by
        expert."""
        if path == "ragged":
            block_rows = 1
        elif block_rows is None:
            block_rows = block_rows_for(choices.size, self.n_experts)
        groups = group_by_expert(choices, self.n_experts, block_rows)
        rows = x.at[groups.source].get(mode="fill", fill_value=0)  # padding rows read zeros

        def product(h, w):
            if path == "ragged":
                return jax.lax.ragged_dot(h, w, groups.sizes)
            blocks = h.reshape(-1, block_rows, h.shape[-1])
            return jnp.einsum("nbi,nio->nbo", blocks, w[groups.block_expert]).reshape(
                h.shape[0], -1)

        return self._feed_forward(rows, product)[groups.row_of_choice]

    def _feed_forward(self, x, product: Callable[[Array, Array], Array]) -> Array:
        """The SwiGLU feed-forward, `product(h, w)` multiplying rows `h` by stacked weights `w`."""
        gate, up = jnp.split(product(x, self.gate_up), 2, axis=-1)
        return product(gated(gate, up, self.activation), self.down)


def block_rows_for(n_choices: int, n_experts: int) -> int:
    """Rows per block of the "blocks" path for `n_choices` token-expert choices: small enough
    that a block of padding per expert stays within an eighth of the rows, at most
    `MAX_BLOCK_ROWS`."""
    return max(1, min(MAX_BLOCK_ROWS, n_choices // (8 * n_experts)))


class Groups(NamedTuple):
    """Where each token-expert choice goes when the choices are grouped by expert.

    - `source`: `(n_rows,)`, the token each grouped row reads; out of range for padding rows.
    - `row_of_choice`: `(tokens, k)`, the grouped row holding each choice's result.
    - `sizes`: `(n_experts,)`, how many choices each expert got.
    - `block_expert`: `(n_rows / block_rows,)`, the expert of each block of rows.
    """

    source: Int[Array, " n_rows"]
    row_of_choice: Int[Array, "tokens k"]
    sizes: Int[Array, " experts"]
    block_expert: Int[Array, " blocks"]


def group_by_expert(choices: Int[Array, "tokens k"], n_experts: int, block_rows: int) -> Groups:
    """The choices sorted by expert (stably, so by token within an expert), each expert's run
    padded to a multiple of `block_rows`. The padded runs fit in a static number of blocks
    whatever the routing: the choices, plus at most `block_rows - 1` of padding for each expert
    that has any."""
    tokens, k = choices.shape
    n_choices = tokens * k
    n_blocks = (n_choices + min(n_experts, n_choices) * (block_rows - 1)) // block_rows
    flat = choices.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    expert = flat[order]  # of each sorted choice
    sizes = jnp.bincount(flat, length=n_experts)
    padded = -(-sizes // block_rows) * block_rows
    padded_end = jnp.cumsum(padded)
    # Sorted choice i is the (i - start)-th of its expert's run, which starts at padded_start.
    row = (padded_end - padded)[expert] + jnp.arange(n_choices) - (jnp.cumsum(sizes) - sizes)[
        expert]
    source = jnp.full(n_blocks * block_rows, tokens).at[row].set(
        order // k, unique_indices=True, indices_are_sorted=True)
    row_of_choice = jnp.zeros(n_choices, row.dtype).at[order].set(row, unique_indices=True)
    # Blocks past the last expert's run hold only padding; any expert will do for them.
    block_expert = jnp.searchsorted(padded_end, jnp.arange(n_blocks) * block_rows, side="right")
    return Groups(source, row_of_choice.reshape(tokens, k), sizes,
                  jnp.minimum(block_expert, n_experts - 1))
