"""Sharding constraints on activations by logical axis, so that no component names a mesh axis.

A component marks an activation with what its dimensions mean, `constrain(x, ("batch", "seq",
"embed"))`; whoever runs the model (the trainer) says where those logical axes live by installing
a rule with `activation_sharding`. Without a rule, in sampling, tests or a user's own code,
`constrain` returns its input untouched, so components stay usable on one device and know nothing
of meshes (as levanter's axis mappings and MaxText's logical axis rules do for activations).

Why constrain at all: XLA propagates shardings from the placed inputs (the batch, the weights)
through the computation, but between a block's output and the next block's input it may settle
on a layout other than the intended one: with weights split over `fsdp` (and `tensor`) it splits
the residual stream like the weights that produced it and adds collectives to undo that (several
times the all-gathers in the compiled step: `bench/bench_collectives.py`). A constraint at each
block boundary pins the residual stream where the rule says (under the trainer's: the batch over
`data` x `fsdp`, everything else whole) and gives XLA a fixed point to propagate from in every
layer.
"""

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax
from jax.sharding import Sharding
from jaxtyping import Array

# A logical axis per dimension, None for one that may lie anywhere.
LogicalAxes = tuple[str | None, ...]
Rule = Callable[[LogicalAxes], Sharding | None]

_RULE: contextvars.ContextVar[Rule | None] = contextvars.ContextVar("activation_rule",
                                                                    default=None)


@contextlib.contextmanager
def activation_sharding(rule: Rule | None) -> Iterator[None]:
    """Within the block, `constrain` places activations where `rule` says.

    **Arguments:**

    - `rule`: maps an activation's logical axes (`"batch"`, `"seq"`, `"embed"`) to a
        `jax.sharding.Sharding`, or to None to leave that activation unconstrained. None
        uninstalls any outer rule.

    Constraints are taken when a function is traced, so install the rule *inside* the jitted
    function (with the mesh a static argument or a closure): `jit` caches its trace by its
    arguments, not by this context, and a rule installed around a call that is already
    compiled would not apply.
    """
    token = _RULE.set(rule)
    try:
        yield
    finally:
        _RULE.reset(token)


def constrain(x: Array, axes: LogicalAxes) -> Array:
    """`x` constrained to the sharding the installed rule gives `axes`, or `x` itself (the same
    object, adding nothing to the computation) when no rule is installed or it gives None.

    **Arguments:**

    - `x`: an activation with one dimension per entry of `axes`.
    - `axes`: the logical axis of each dimension of `x`, e.g. `("batch", "seq", "embed")`.
    """
    if len(axes) != x.ndim:
        raise ValueError(f"logical axes {axes} name {len(axes)} dimensions; x has shape "
                         f"{x.shape}")
    rule = _RULE.get()
    sharding = None if rule is None else rule(axes)
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)
