import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from gptzoo.nn._typecheck import typecheck
from gptzoo.nn.linear import Linear, affine


class LoRALinear(eqx.Module):
    """A `Linear` plus a low-rank update (LoRA, Hu et al. 2021):
    `x @ weight + bias + scale * (dropout(x) @ lora_a) @ lora_b`.

    The base `weight` and `bias` keep their `Linear` names, so a model's parameter paths (and
    their sharding rules) are the same with or without adapters; `lora_a` and `lora_b` are the
    new leaves. A projection that fuses several (q|k|v, gate|up) can carry one adapter per part
    (`splits`, their output widths): part `j` of the outputs gets `x @ a_j @ b_j`, `a_j` the
    `j`-th block of `rank` columns of `lora_a` and `b_j` the `j`-th block of columns of
    `lora_b`, which is exactly a separate adapter on each of the unfused projections. `lora_b`
    starts at zero, so the model starts as the one it adapts; `lora_a` is drawn as PEFT's default
    (`torch.nn.Linear`'s kaiming-uniform with `a=sqrt(5)`: uniform within `1 / sqrt(d_in)`).

    **Arguments:**

    - `linear`: the projection to adapt. Its arrays may carry leading axes (a `Stack`'s layers);
      the adapter's then do too, one adapter per layer.
    - `rank`: each adapter's rank.
    - `scale`: the update's factor (PEFT's `lora_alpha / r`, or `lora_alpha / sqrt(r)`).
    - `dropout`: dropout on the adapter's input, active when a `key` is passed.
    - `splits`: the output widths of the fused parts (default: one part, the whole output).
    - `key`: a PRNG key, or one per layer (shape `linear.weight.shape[:-2]`) for a stack.
    """

    weight: Float[Array, "*layers d_in d_out"]
    bias: Float[Array, "*layers d_out"] | None
    lora_a: Float[Array, "*layers d_in parts_rank"]
    lora_b: Float[Array, "*layers rank d_out"]
    dropout: eqx.nn.Dropout
    scale: float = eqx.field(static=True)
    splits: tuple[int, ...] = eqx.field(static=True)

    def __init__(self, linear: Linear, rank: int, *, scale: float, dropout: float = 0.0,
                 splits: tuple[int, ...] | None = None, key: PRNGKeyArray):
        *layers, d_in, d_out = linear.weight.shape
        self.weight, self.bias = linear.weight, linear.bias
        self.splits = (d_out,) if splits is None else tuple(splits)
        self.scale, self.dropout = scale, eqx.nn.Dropout(dropout)
        bound = 1 / math.sqrt(d_in)

        def draw(k):
            return jax.random.uniform(k, (d_in, len(self.splits) * rank), linear.weight.dtype,
                                      -bound, bound)

        for _ in layers:  # one key per layer
            draw = jax.vmap(draw)
        self.lora_a = draw(key)
        self.lora_b = jnp.zeros((*layers, rank, d_out), linear.weight.dtype)

    def __check_init__(self):
        if sum(self.splits) != self.weight.shape[-1]:
            raise ValueError(f"LoRALinear splits={self.splits} do not add up to the "
                             f"{self.weight.shape[-1]} outputs; pass the fused parts' widths")
        if self.lora_a.shape[-1] != len(self.splits) * self.rank:
            raise ValueError(f"lora_a has {self.lora_a.shape[-1]} columns, not {len(self.splits)} "
                             f"parts x rank {self.rank}")

    @property
    def rank(self) -> int:
        return self.lora_b.shape[-2]

    @typecheck
    def __call__(self, x: Float[Array, "*rows d_in"], *, key: PRNGKeyArray | None = None,
                 out_dtype=None) -> Float[Array, "*rows d_out"]:
        """`out_dtype` as `Linear`'s; `key` drives the adapter's input dropout."""
        y = affine(x, self.weight, self.bias, out_dtype)
        h = affine(self.dropout(x, key=key, inference=key is None), self.lora_a, None)
        hs = jnp.split(h, len(self.splits), axis=-1)
        bs = jnp.split(self.lora_b, np.cumsum(self.splits)[:-1], axis=-1)
        update = jnp.concatenate(
            [affine(h_j, b_j, None, out_dtype) for h_j, b_j in zip(hs, bs, strict=True)], axis=-1)
        return y + (self.scale * update).astype(y.dtype)

    def delta(self) -> Float[Array, "*layers d_in d_out"]:
        """`scale * A B` as one `(d_in, d_out)` matrix (per layer): what merging adds."""
        a_parts = jnp.split(self.lora_a, len(self.splits), axis=-1)
        b_parts = jnp.split(self.lora_b, np.cumsum(self.splits)[:-1], axis=-1)
        return self.scale * jnp.concatenate(
            [jnp.matmul(a, b, precision="highest")
             for a, b in zip(a_parts, b_parts, strict=True)], axis=-1)

    def merged(self) -> Linear:
        """The plain `Linear` that computes the same (without dropout): `weight + delta()`."""
        shell = eqx.filter_eval_shape(Linear, 1, 1, use_bias=self.bias is not None,
                                      key=jax.random.PRNGKey(0))
        weight = (self.weight + self.delta()).astype(self.weight.dtype)
        if self.bias is None:
            return eqx.tree_at(lambda linear: linear.weight, shell, weight)
        return eqx.tree_at(lambda linear: (linear.weight, linear.bias), shell,
                           (weight, self.bias))
