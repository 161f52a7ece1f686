"""Scan over layers: identical blocks held as one block whose arrays carry a leading layer axis.

A `Stack` runs its layers with `jax.lax.scan`, so a deep model traces and compiles one block
rather than `n_layers` of them, and can rematerialise each block's activations in the backward
pass (`remat`) to trade compute for memory. Its parameter paths are the block's with `layers.`
in front, e.g. `blocks.layers.attention.qkv.weight` of shape `(n_layers, ...)`.

Between blocks the residual stream is `constrain`ed to the logical axes `("batch", "seq",
"embed")`, so a trainer that installs an activation rule pins its layout at every block boundary,
scanned or not (see `gptzoo.nn.activation_sharding`); without a rule this costs nothing.

Weights exchanged by name (checkpoints of the other layout, Hugging Face files, `--init-from`)
use per-layer names, `blocks.3.attention.qkv.weight`: `unstacked` gives any model that view and
`same_layout` takes it back.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from gptzoo.nn._typecheck import typecheck
from gptzoo.nn.activation_sharding import constrain
from gptzoo.nn.leaves import is_array_or_shape

# jax.checkpoint_policies' other members (save_*, offload_*) build a policy from arguments.
REMAT_POLICIES = ("none", "full", *sorted(
    name for name in dir(jax.checkpoint_policies)
    if not name.startswith(("_", "save_", "offload_"))))


class Stack(eqx.Module):
    """`n_layers` identical blocks as one, run by `jax.lax.scan`.

    Unrolled, XLA compiles every layer (compile time grows with depth, as for a tuple of blocks)
    and does not copy each layer's saved activations into and out of the loop's stacked buffers,
    which trains faster (docs/benchmarks.md, "Design choices").

    Indexing, `len` and iteration give the blocks one at a time, as a tuple of blocks would.
    `Stack.from_blocks` stacks a sequence of identical blocks.

    **Arguments:**

    - `layers`: a block whose arrays have a leading layer axis.
    - `n_layers`: the length of that axis.
    - `remat`: "none", "full" (keep only each block's input for the backward pass) or a
        `jax.checkpoint_policies` name (e.g. "dots_with_no_batch_dims_saveable"), applied per
        block.
    - `unroll`: write the scan's layers out one after another instead of looping over them, as a
        tuple of blocks would be, with the parameters still stacked and `remat` still per block.
    """

    layers: eqx.Module
    n_layers: int = eqx.field(static=True)
    remat: str = eqx.field(static=True, default="none")
    unroll: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        check_remat(self.remat)

    @classmethod
    def from_blocks(cls, blocks: Sequence[eqx.Module], remat: str = "none") -> "Stack | None":
        """The blocks stacked, or None when they differ in structure, static fields, non-array
        fields or array shapes (then they cannot share one compiled body)."""
        if not blocks:
            return None
        parts = [eqx.partition(b, is_array_or_shape) for b in blocks]
        arrays, static = zip(*parts, strict=True)
        if any(jax.tree.structure(b) != jax.tree.structure(blocks[0]) for b in blocks):
            return None
        shapes = [[(tuple(x.shape), x.dtype) for x in jax.tree.leaves(a)] for a in arrays]
        if any(s != static[0] for s in static) or any(s != shapes[0] for s in shapes):
            return None
        layers = jax.tree.map(lambda *xs: _stack(xs), *arrays)
        return cls(eqx.combine(layers, static[0]), len(blocks), remat)

    def __len__(self) -> int:
        return self.n_layers

    def __getitem__(self, i: int) -> eqx.Module:
        if not -self.n_layers <= i < self.n_layers:
            raise IndexError(f"layer {i} of a Stack of {self.n_layers}")
        return jax.tree.map(lambda a: _layer(a, i), self.layers, is_leaf=is_array_or_shape)

    def __iter__(self):
        return (self[i] for i in range(self.n_layers))

    @typecheck
    def __call__(
        self, x: Float[Array, "*batch seq d_model"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch seq d_model"] | tuple[Float[Array, "*batch seq d_model"], Any]:
        """Every layer in order; layer i's dropout key is `jax.random.split(key, n_layers)[i]`.

        A block that returns `(x, aux)` (e.g. `MoEBlock`'s router statistics) makes the stack
        return `(x, aux summed over the layers)`; the per-layer `aux` leave the scan as its
        outputs, so blocks without one carry nothing extra.
        """
        keys = None if key is None else jax.random.split(key, self.n_layers)
        params, static = eqx.partition(self.layers, eqx.is_array)

        def layer(x, params, key):
            return eqx.combine(params, static)(x, key=key)

        layer = self._checkpointed(layer)

        def step(x, xs):
            x, aux = split_aux(layer(x, *xs))
            return residual(x), aux

        x, aux = jax.lax.scan(step, x, (params, keys), unroll=self.unroll)
        return x if aux is None else (x, jax.tree.map(lambda a: a.sum(0), aux))

    def decode(self, x: Float[Array, "seq d_model"], positions: Int[Array, " seq"], cache):
        """Each layer's `decode` in order over `cache`, a layer cache with a leading layer axis."""
        params, static = eqx.partition(self.layers, eqx.is_array)

        def layer(x, xs):
            params, cache = xs
            return eqx.combine(params, static).decode(x, positions, cache)

        return jax.lax.scan(layer, x, (params, cache))

    def _checkpointed(self, fn: Callable) -> Callable:
        if self.remat == "none":
            return fn
        policy = None if self.remat == "full" else getattr(jax.checkpoint_policies, self.remat)
        # Inside a scan the loop already keeps XLA from merging recomputation away.
        return jax.checkpoint(fn, policy=policy, prevent_cse=False)


def check_remat(remat: str) -> None:
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r} is not a rematerialisation policy; choose one of "
                         f"{', '.join(REMAT_POLICIES)}")


def _stack(xs):
    if isinstance(xs[0], jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype)
    return jnp.stack(xs)


def _layer(a, i: int):
    if isinstance(a, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
    return a[i] if eqx.is_array(a) else a


def _is_stack(x) -> bool:
    return isinstance(x, Stack)


def stack_blocks(blocks: Sequence[eqx.Module], scan: bool = True) -> "Stack | tuple":
    """`blocks` as a `Stack` when `scan` and they are identical in structure, else a tuple."""
    stack = Stack.from_blocks(blocks) if scan else None
    return tuple(blocks) if stack is None else stack


def run_blocks(blocks: "Stack | tuple", x: Array, *, key: PRNGKeyArray | None = None
               ) -> Array | tuple[Array, Any]:
    """`x` through the blocks in order, block i's dropout key `jax.random.split(key, n)[i]`
    either way, so a `Stack` and the tuple of its blocks compute the same. Blocks that return
    `(x, aux)` make it return `(x, their aux summed)`, as a `Stack` does."""
    if isinstance(blocks, Stack):
        return blocks(x, key=key)
    keys = [None] * len(blocks) if key is None else jax.random.split(key, len(blocks))
    total = None
    for block, block_key in zip(blocks, keys, strict=True):
        x, aux = split_aux(block(x, key=block_key))
        x = residual(x)
        if aux is not None:
            total = aux if total is None else jax.tree.map(jnp.add, total, aux)
    return x if total is None else (x, total)


def split_aux(out) -> tuple[Array, Any]:
    """A block's output as `(x, aux)`, `aux` None for a block that returns `x` alone."""
    return out if isinstance(out, tuple) else (out, None)


def residual(x: Float[Array, "*batch seq d_model"]) -> Float[Array, "*batch seq d_model"]:
    """The residual stream between two blocks, constrained by its logical axes when an
    activation rule is installed. One example's `(seq, d_model)` gets `("seq", "embed")`: under
    `jax.vmap` over examples the mapped batch dimension is left unconstrained, not replicated.
    More than one batch dimension is left alone. Not used in the KV-cached decode, which runs
    per example outside any rule."""
    if x.ndim not in (2, 3):
        return x
    return constrain(x, ("batch", "seq", "embed")[-x.ndim:])


def decode_blocks(blocks: "Stack | tuple", x: Array, positions: Array, cache):
    """`decode` through the blocks: `cache` is the `init_caches` of the same blocks."""
    if isinstance(blocks, Stack):
        return blocks.decode(x, positions, cache)
    new_cache = []
    for block, block_cache in zip(blocks, cache, strict=True):
        x, block_cache = block.decode(x, positions, block_cache)
        new_cache.append(block_cache)
    return x, tuple(new_cache)


def init_caches(blocks: "Stack | tuple", init: Callable[[eqx.Module], object]):
    """`init(block)` for every block: one cache with a leading layer axis for a `Stack`."""
    if isinstance(blocks, Stack):
        return eqx.filter_vmap(init)(blocks.layers)
    return tuple(init(b) for b in blocks)


def block_kinds(blocks: "Stack | tuple") -> tuple[eqx.Module, ...]:
    """One module per kind of block, for questions such as "is it a `CachedBlock`?" that need
    not slice a `Stack` into its layers."""
    return (blocks.layers,) if isinstance(blocks, Stack) else tuple(blocks)


def with_scan_settings(tree, remat: str = "none", unroll: bool = False):
    """`tree` (a model) with every `Stack`'s rematerialisation set to `remat` and its `unroll`
    to `unroll`. Blocks kept as a tuple (not identical, or built with `scan_layers=False`) are
    already unrolled and are not rematerialised: any `remat` but "none" is refused for a model
    without a `Stack`."""
    check_remat(remat)
    if remat != "none" and not any(map(_is_stack, jax.tree.leaves(tree, is_leaf=_is_stack))):
        raise ValueError(f"remat={remat!r} applies per block of a scanned stack and this model "
                         "has none (its blocks differ, or scan_layers is off); use remat=none "
                         "or build the model with scan_layers=true")
    return jax.tree.map(
        lambda x: dataclasses.replace(x, remat=remat, unroll=unroll) if _is_stack(x) else x,
        tree, is_leaf=_is_stack)


def unstacked(tree):
    """`tree` (a model, a template of shapes, or optimizer state) with every `Stack` replaced
    by the tuple of its blocks: per-layer parameter paths such as `blocks.3.mlp.up.weight`."""
    return jax.tree.map(lambda x: tuple(x) if _is_stack(x) else x, tree, is_leaf=_is_stack)


def stacked(tree):
    """`tree` with every tuple of identical modules made a `Stack` (`unstacked`'s inverse)."""

    def is_blocks(x) -> bool:
        return isinstance(x, tuple) and bool(x) and all(isinstance(b, eqx.Module) for b in x)

    def one(x):
        stack = Stack.from_blocks(x) if is_blocks(x) else None
        return x if stack is None else stack

    return jax.tree.map(one, tree, is_leaf=is_blocks)


def same_layout(template, tree):
    """`tree`, which holds `template`'s parameters stacked or not, in `template`'s layout:
    stacked where `template` has a `Stack` (with its `remat`), per layer where it has blocks."""

    def one(t, x):
        if not _is_stack(t):
            return x
        stack = Stack.from_blocks(tuple(x), t.remat)
        if stack is None:
            raise ValueError(f"the {len(x)} blocks in place of a Stack differ from one another")
        return stack

    return jax.tree.map(one, template, unstacked(tree), is_leaf=_is_stack)


def map_layers(fn: Callable, tree):
    """`jax.tree.map(fn, tree)` over arrays, where a `Stack`'s arrays are shown to `fn` as one
    layer's (a `jax.ShapeDtypeStruct` without the layer axis): e.g. weight decay on matrices."""

    def one(x):
        if _is_stack(x):
            return eqx.tree_at(lambda s: s.layers, x, jax.tree.map(
                lambda a: fn(jax.ShapeDtypeStruct(a.shape[1:], a.dtype)), x.layers))
        return jax.tree.map(fn, x)

    return jax.tree.map(one, tree, is_leaf=_is_stack)
