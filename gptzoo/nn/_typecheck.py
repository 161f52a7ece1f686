"""Runtime shape checks: jaxtyping annotations enforced by beartype at trace time (free in jit).

A failed check is re-raised as a `ShapeError` whose first line names the function, the argument
and the mismatched dimension with both sizes (jaxtyping's own message opens with a generic
"Type-check error whilst checking the parameters of ..." and keeps the cause out of reach of the
CLI's one-line error); jaxtyping's full message follows on the next lines.
"""

import functools
import inspect
import types
import typing

from jaxtyping import AbstractArray, TypeCheckError, jaxtyped


class ShapeError(TypeCheckError):
    """A jaxtyping shape or dtype check failed; the first line says which dimension and why."""


def typecheck(fn):
    """`jaxtyped(typechecker=beartype)`, with the failure explained on the error's first line.

    The wrapper adds only a `try` to each call, and under `jit` it runs at trace time only. The
    check is built on the first call: importing beartype and decorating every checked function
    took 0.15-0.25 s of each command's start-up, and a program read back from disk
    (`gptzoo.stored_jit`) is never traced.
    """
    checked = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal checked
        if checked is None:
            from beartype import beartype

            checked = jaxtyped(fn, typechecker=beartype)
        try:
            return checked(*args, **kwargs)
        except ShapeError:
            raise  # from a checked function further down, already explained
        except TypeCheckError as e:
            if not str(e).startswith("Type-check error whilst checking the parameters"):
                raise  # a return-value error: jaxtyping's message shows the value
            raise ShapeError(f"{_explain(fn, args, kwargs)}\n{e}") from None

    return wrapper


def _explain(fn, args, kwargs) -> str:
    """Replays the parameters' checks in order and describes the first one that fails."""
    signature = inspect.signature(fn, eval_str=True)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    where = f"(in {fn.__qualname__})"
    seen = []  # (parameter, value, annotation) checked so far: they bound the dimensions
    with jaxtyped("context"):
        for name, value in bound.arguments.items():
            hints = _array_hints(signature.parameters[name].annotation)
            if not hints or value is None:
                continue
            reasons = [hint.__instancecheck_str__(value) for hint in hints]
            if all(reasons):
                shown = _describe(value)
                reason = reasons[0]
                binders = [f"{n} {_describe(v)}" for n, v, h in seen
                           if any(d in _dim_names(h) for d in _dim_names(hints[0]))]
                bound_by = f", bound by {', '.join(binders)}" if binders else ""
                hint = f"{hints[0].__name__.split('[')[0]}[Array, '{hints[0].dim_str}']"
                return f"{name} {shown} against {hint}: {reason}{bound_by} {where}"
            seen.append((name, value, hints[reasons.index("")]))
    return f"the arguments' shapes do not fit their annotations together {where}"


def _array_hints(annotation) -> list:
    """The jaxtyping array types in an annotation such as `Float[Array, "d"] | None`."""
    if isinstance(annotation, type) and issubclass(annotation, AbstractArray):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [h for a in typing.get_args(annotation) for h in _array_hints(a)]
    return []


def _dim_names(hint) -> set[str]:
    return {d.lstrip("*#") for d in hint.dim_str.split()}


def _describe(value) -> str:
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    return f"{dtype}{list(shape)}" if shape is not None else type(value).__name__
