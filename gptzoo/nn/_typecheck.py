"""Runtime shape checks: jaxtyping annotations enforced by beartype at trace time (free in jit)."""

from beartype import beartype
from jaxtyping import jaxtyped

typecheck = jaxtyped(typechecker=beartype)
