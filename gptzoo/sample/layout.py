"""How the decode programs hold a model and read its cache: the model's decoding form (blocks
written out, weights in the rowwise layout), kept for the last model sampled from, and the
number of cache slots a decode chunk reads (its extent)."""

import weakref

import equinox as eqx
import jax

from gptzoo.nn import Stack, rowwise_layout, unstacked
from gptzoo.nn.rowwise import rowwise_pays
from gptzoo.stored_jit import stored_jit

MIN_EXTENT = 64  # fewest KV cache slots a decode chunk reads (see `extent`)


def extent(size: int, end: int) -> int:
    """How many cache slots a decode chunk reads when the positions it feeds end before `end`:
    the smallest of `size`, `size/2`, `size/4`, ... (at least `MIN_EXTENT`) that holds them.
    Each extent is its own program, so a generation compiles at most a few, and halving (rather
    than quartering) keeps the slots read close to those filled (docs/benchmarks.md, "Design
    choices")."""
    slots = size
    while slots // 2 >= max(end, MIN_EXTENT):
        slots //= 2
    return slots


def reads_by_extent(model, cache) -> bool:
    """Whether decode chunks read only the cache slots they need (`extent`): each extent is
    another program to compile, which pays only where the batch's cache is at least an eighth of
    the weights' bytes (docs/benchmarks.md, "Design choices")."""
    def nbytes(tree) -> int:
        return sum(a.nbytes for a in jax.tree.leaves(eqx.filter(tree, eqx.is_array)))
    return cache is not None and 8 * nbytes(cache) >= nbytes(model)


@stored_jit
def decoding_form(model, unstack: bool, rows_first: bool):
    """The model as the decode loop reads it, built in one program (slicing the layers out op by
    op is slower at start-up): its blocks written out (`unstack`) and, for batches `rowwise_pays`
    for, its weights in `rowwise_layout` (`rows_first`)."""
    model = unstacked(model) if unstack else model
    return rowwise_layout(model) if rows_first else model


# The last model converted by `for_decoding`: [(weak reference to it, (unstack, rows_first),
# form)]. One entry, dropped when its model is garbage-collected (the reference's callback; a
# replaced reference never calls back): a loop of `generate` calls on one model converts it once,
# at the price of keeping one converted copy while the model lives.
_last_form: list[tuple] = []


def for_decoding(model, n_rows: int):
    """`decoding_form` of `model` for a batch of `n_rows`, or the model itself when that form
    changes nothing (a program would still copy every weight); the last model's form is reused.

    Blocks are written out because a scan over them writes every layer's whole cache out at every
    token, where a written-out block updates its cache in place; the rowwise layout multiplies a
    few rows faster on CPU (`gptzoo.nn.rowwise`). Both cost a copy of the weights while
    generating (docs/benchmarks.md, "Design choices").
    """
    def is_stack(x) -> bool:
        return isinstance(x, Stack)

    unstack = any(map(is_stack, jax.tree.leaves(model, is_leaf=is_stack)))
    rows_first = rowwise_pays(n_rows)
    if not (unstack or rows_first):
        return model
    flags = (unstack, rows_first)
    if _last_form and _last_form[0][0]() is model and _last_form[0][1] == flags:
        return _last_form[0][2]
    form = decoding_form(model, unstack, rows_first)
    try:
        ref = weakref.ref(model, lambda _: _last_form.clear())
    except TypeError:  # a model that takes no weak references: converted at every call
        return form
    _last_form[:] = [(ref, flags, form)]
    return form
