"""`--set section.field=value`: command-line text parsed to the field's type."""

import ast
import json
import types
import typing
from typing import Any

from gptzoo.errors import GptzooError


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise GptzooError(f"--set {pair!r} is not KEY=VALUE; "
                              "write e.g. --set trainer.max_steps=100")
        overrides[key.strip()] = value.strip()
    return overrides



def coerce(key: str, value: Any, annotation: Any) -> Any:
    union = isinstance(annotation, types.UnionType)
    options = typing.get_args(annotation) if union else (annotation,)
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        if type(None) in options:
            return None
    for kind in (o for o in options if o is not type(None)):
        try:
            return _parse(value, kind)
        except (TypeError, ValueError):
            continue
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise GptzooError(f"{key} must be {names}, got {value!r}; e.g. --set {key}={_example(options)}")


def _parse(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError(value)
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if kind is str:
        return str(value)
    if kind is list:  # from the command line, JSON or Python: '[[0,16],[200,32]]', '[(0,16)]'
        value = _literal(value) if isinstance(value, str) else value
        if not isinstance(value, list | tuple):
            raise ValueError(value)
        return [list(v) if isinstance(v, tuple) else v for v in value]  # one form, either syntax
    raise TypeError(f"cannot parse {kind}")


def _literal(text: str) -> Any:
    """A JSON value, or a Python literal (tuples) as the recipe file itself would write it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:
            return ast.literal_eval(text)
        except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
            raise ValueError(text) from e


def _example(options: tuple) -> str:
    return {int: "8", float: "0.5", bool: "true", str: "text",
            list: "'[[0,16],[200,32]]'"}.get(options[0], "...")
