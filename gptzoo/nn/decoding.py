"""What a component declares so that a model built from it can decode from a KV cache.

A model decodes one chunk of new tokens at a time when each of its blocks is a `CachedBlock` (it
makes a cache and extends it) and none of its parts is a `MixesPositions`: a part that mixes
positions outside attention (a spatial gating unit, head-QK) reads every earlier position's
input, which a cache of attention keys and values does not hold. Such a model is sampled by
recomputing its context instead.
"""

from typing import Protocol, runtime_checkable

import equinox as eqx
import jax
from jaxtyping import Array, Float, Int


@runtime_checkable
class CachedBlock(Protocol):
    """A block that decodes one example's new positions from a cache of its past ones."""

    def init_cache(self, block_size: int):
        """An empty cache (a PyTree) for `block_size` positions."""

    def decode(self, x: Float[Array, "seq d_model"], positions: Int[Array, " seq"], cache):
        """`(output, cache)`: the block at `positions`, reading and extending `cache`."""


class MixesPositions(eqx.Module):
    """Base class of a component that mixes positions outside attention: subclassing it is how
    the component says that a model holding it cannot decode from a KV cache."""


def _is_mixer(x) -> bool:
    return isinstance(x, MixesPositions)


def mixes_positions(tree) -> bool:
    """Whether any part of `tree` (a model, a block) is a `MixesPositions`."""
    return any(map(_is_mixer, jax.tree.leaves(tree, is_leaf=_is_mixer)))


def decodes_from_cache(blocks: tuple[eqx.Module, ...], *parts) -> bool:
    """Whether a model of `blocks` (one per kind: `nn.stack.block_kinds`) and its other `parts`
    decodes from a KV cache: every block a `CachedBlock`, no part a `MixesPositions`."""
    return (all(isinstance(b, CachedBlock) for b in blocks)
            and not mixes_positions((blocks, parts)))
