"""`stored_jit`: `eqx.filter_jit` whose compiled programs can be kept on disk and run by a later
process without tracing them again.

JAX's persistent compilation cache skips XLA's compilation but still traces and lowers a program
to find its key, which was most of `gptzoo sample`'s start-up: kept because it saves well over
half a second of a second `gptzoo sample` (`python bench/bench_stored_jit.py`, docs/benchmarks.md,
"Design choices"). A stored program is found by a key computed from the arguments alone (their
structure, static values, shapes and dtypes), the code that could have traced it and the JAX
that compiled it, and is loaded with `jax.experimental.serialize_executable`, as MaxText's
ahead-of-time compilation does.

The code in the key is every loaded Python file outside the interpreter's own and its
site-packages (gptzoo in an editable install, a run's recipe, the modules it imports), by path,
size and modification time, as Python's own bytecode cache checks staleness.
"""

import contextlib
import functools
import hashlib
import importlib.metadata
import logging
import os
import pickle
import re
import sys
import sysconfig
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
from jax.experimental import serialize_executable

from gptzoo.atomic import write_bytes_atomic
from gptzoo.workarounds import compile_past_persistent_cache

log = logging.getLogger(__name__)

_directory: Path | None = None  # where programs are stored; None keeps them in memory only
_IN_MEMORY = 32  # compiled programs kept per function: tests build many shapes in one process
_ON_DISK = 256  # programs kept in the folder, the least recently used removed


@functools.cache
def _versions() -> tuple[str, ...]:
    """What traces and compiles a program from outside the fingerprinted files (gptzoo itself
    among them when it is installed rather than editable)."""
    def version(distribution: str) -> str:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:  # gptzoo run from a source tree
            return "?"
    return tuple(map(version, ("gptzoo", "equinox", "jax", "jaxlib")))


def store_programs_in(directory: str | Path | None) -> None:
    """Keep compiled programs of every `stored_jit` function under `directory` from now on
    (None: only in memory)."""
    global _directory
    _directory = None if directory is None else Path(directory)


class _Slot:
    """Where an output array goes, in the pickled structure of a stored program's output."""


def _split(leaves: list) -> tuple[list, tuple]:
    """The array leaves, and every leaf with None in place of an array (None is never a leaf)."""
    return ([x for x in leaves if eqx.is_array(x)],
            tuple(None if eqx.is_array(x) else x for x in leaves))


def _merge(static: tuple, arrays) -> list:
    """The inverse of `_split`."""
    arrays = iter(arrays)
    return [next(arrays) if x is None else x for x in static]


def stored_jit(fn: Callable | None = None, *, donate: str = "none"):
    """`StoredJit(fn, donate)`, as a decorator with or without arguments (`@stored_jit`,
    `@stored_jit(donate="all-except-first")`), as `eqx.filter_jit` is used."""
    if fn is None:
        return lambda fn: StoredJit(fn, donate)
    return StoredJit(fn, donate)


class StoredJit:
    """`fn` compiled per argument structure, static values, shapes and dtypes, as
    `eqx.filter_jit(fn)` would be, and read from disk when `store_programs_in` names a folder
    that holds the program. Its outputs' non-array leaves (an int, a None cache) are returned as
    traced.

    **Arguments:**

    - `fn`: the function; its array arguments (JAX or NumPy, at any depth) are traced, the rest
        are static and must be hashable.
    - `donate`: `"none"`, or `"all-except-first"` to donate the arrays of every argument but the
        first (the model) to the outputs, as `eqx.filter_jit`'s option of that name.

    `n_compiled` and `n_loaded` count the programs this function has compiled and read from disk.
    """

    def __init__(self, fn: Callable, donate: str = "none"):
        if donate not in ("none", "all-except-first"):
            raise ValueError(f"donate={donate!r}: pass 'none' or 'all-except-first'")
        self.fn, self.donate = fn, donate
        self.__wrapped__, self.__doc__ = fn, fn.__doc__
        self._programs: OrderedDict = OrderedDict()
        self.n_compiled = self.n_loaded = 0

    def __call__(self, *args):
        # One flatten per call: partitioning the model as eqx.filter_jit does costs every call
        # time per array of the model (docs/benchmarks.md, "Design choices").
        leaves, treedef = jax.tree.flatten(args)
        arrays, static = _split(leaves)
        # A NumPy array goes to the default device (None here); a JAX array stays where it is.
        avals = tuple((a.shape, a.dtype, getattr(a, "weak_type", False),
                       getattr(a, "sharding", None)) for a in arrays)
        key = (treedef, static, avals, jax.config.jax_default_device)
        if key not in self._programs:
            self._programs[key] = self._load_or_compile(args, arrays, key)
            if len(self._programs) > _IN_MEMORY:
                self._programs.popitem(last=False)
        self._programs.move_to_end(key)
        compiled, out_tree, out_static = self._programs[key]
        return out_tree.unflatten(_merge(out_static, compiled(*arrays)))

    def _load_or_compile(self, args: tuple, arrays: list, key: tuple):
        """(compiled program, output structure, output leaves with None for its arrays)."""
        path = None if _directory is None else _directory / f"{self._disk_key(key)}.program"
        if path is not None and path.is_file():
            try:
                program = _load(path, arrays)
                with contextlib.suppress(OSError):  # a read-only store is still read
                    os.utime(path)  # recently used: kept when the folder is trimmed
                self.n_loaded += 1
                return program
            except Exception as e:  # a file from a crash or another jaxlib: compile instead
                log.warning("ignoring stored program %s (%s); compiling it again", path, e)
        treedef, static = key[0], key[1]
        out = []

        def run(*arrays):
            out_leaves, out_tree = jax.tree.flatten(self.fn(*treedef.unflatten(_merge(static,
                                                                                    arrays))))
            out_arrays, out_static = _split(out_leaves)
            out.append((out_tree, out_static))
            return out_arrays

        run.__name__ = run.__qualname__ = self.fn.__name__  # what JAX's logs and profiles show

        first = len(_split(jax.tree.leaves(args[0]))[0])
        donated = tuple(range(first, len(arrays))) if self.donate != "none" else ()
        with warnings.catch_warnings():  # an unused donated scalar is no concern here
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            lowered = jax.jit(run, donate_argnums=donated).lower(*arrays)
        compiled = lowered.compile() if path is None else compile_past_persistent_cache(lowered)
        self.n_compiled += 1
        (out_tree, out_static), = out
        if path is not None:
            _store(path, compiled, out_tree, out_static)
        return compiled, out_tree, out_static

    def _disk_key(self, key: tuple) -> str:
        parts = [self.fn.__module__, self.fn.__qualname__, self.donate, *key, sys.version,
                 _versions(), jax.devices(), os.environ.get("XLA_FLAGS", ""),
                 jax.config.jax_enable_x64, _source_fingerprint()]
        # Reprs name functions with their address, which differs between processes.
        text = re.sub(r" at 0x[0-9a-f]+", "", repr(parts))
        return f"{self.fn.__name__.strip('_')}-{hashlib.sha256(text.encode()).hexdigest()[:32]}"


def _store(path: Path, compiled, out_tree, out_static: tuple) -> None:
    """Write a compiled program beside its output structure and its device; a program that cannot
    be written (a read-only cache, an output that does not pickle, a program over several devices,
    which sampling does not run) stays in memory only."""
    devices = {d for sharding in jax.tree.leaves(compiled.input_shardings)
               for d in sharding.device_set}
    if len(devices) != 1:
        return
    try:
        executable, _, _ = serialize_executable.serialize(compiled)
        skeleton = out_tree.unflatten([_Slot() if x is None else x for x in out_static])
        data = pickle.dumps((executable, skeleton, devices.pop().id))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)
    except OSError as e:  # storing only saves start-up time: never fail the caller for it
        log.warning("could not store the compiled program %s (%s)", path, e)
    except (pickle.PicklingError, AttributeError, TypeError) as e:  # e.g. a lambda in an output
        log.debug("program %s not stored: its output does not pickle (%s)", path, e)
    else:
        _trim(path.parent)


def _trim(folder: Path) -> None:
    """Remove all but the `_ON_DISK` most recently used programs."""
    def last_used(path: Path) -> int:
        with contextlib.suppress(OSError):  # another process removed it
            return path.stat().st_mtime_ns
        return 0
    for old in sorted(folder.glob("*.program"), key=last_used)[:-_ON_DISK]:
        with contextlib.suppress(OSError):
            old.unlink()


def _load(path: Path, arrays: list):
    executable, skeleton, device_id = pickle.loads(path.read_bytes())
    (device,) = [d for d in jax.devices() if d.id == device_id]
    leaves, out_tree = jax.tree.flatten(skeleton)
    out_static = tuple(None if isinstance(x, _Slot) else x for x in leaves)
    n_out = sum(x is None for x in out_static)
    compiled = serialize_executable.deserialize_and_load(
        executable, jax.tree.structure((tuple(arrays), {})), jax.tree.structure([0] * n_out),
        execution_devices=[device])
    return compiled, out_tree, out_static


def _source_fingerprint() -> list[tuple[str, int, int]]:
    """(path, size, mtime) of every loaded Python file outside the interpreter and its
    site-packages: the code a program could have been traced from."""
    paths = sysconfig.get_paths()
    library = tuple({paths["stdlib"], paths["platstdlib"], paths["purelib"], paths["platlib"]})
    files = set()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and file.endswith(".py") and not file.startswith(library):
            files.add(file)
    fingerprint = []
    for file in sorted(files):
        try:
            stat = os.stat(file)
        except OSError:
            continue
        fingerprint.append((file, stat.st_size, stat.st_mtime_ns))
    return fingerprint
