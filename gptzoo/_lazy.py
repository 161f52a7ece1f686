"""Package attributes imported on first use (PEP 562), so importing a package stays cheap."""

import importlib
from collections.abc import Callable


def lazy_attributes(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """`(__getattr__, __dir__)` for `package`, whose attribute `name` is `exports[name]`'s
    attribute of that name, imported when first read."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(exports))

    return __getattr__, __dir__
