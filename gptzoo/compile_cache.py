"""Compiled programs kept on disk between `gptzoo` commands, under the user's cache directory
($XDG_CACHE_HOME or ~/.cache, /gptzoo):

- `programs/`: `gptzoo sample`'s own programs, ready to run without tracing (`gptzoo.stored_jit`);
- `jax/`: JAX's persistent compilation cache for every other program (the train chunk, the
  evaluations, the model's initialisation), unless `JAX_COMPILATION_CACHE_DIR` names one already;
  the least recently used programs are removed past `MAX_BYTES`.

A second `gptzoo train` of a recipe skips XLA's compilation of what the first compiled: a 10-step
run of the default recipe took 28 s, then 18 s, on a 2-core CPU. `GPTZOO_NO_COMPILE_CACHE=1`
turns both off; `GPTZOO_COMPILE_CACHE=DIR` puts them under DIR.
"""

import os
from pathlib import Path

import jax

from gptzoo.stored_jit import store_programs_in
from gptzoo.workarounds import whole_compilation_cache_entries

MAX_BYTES = 4 * 2**30  # the default recipe's programs take under 1 MB on a CPU


def enable_compilation_cache() -> None:
    """Keep this process's compiled programs on disk, and read those kept by earlier ones."""
    if os.environ.get("GPTZOO_NO_COMPILE_CACHE", "") not in ("", "0"):
        return
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptzoo"
    path = Path(os.environ.get("GPTZOO_COMPILE_CACHE") or base)
    store_programs_in(path / "programs")
    whole_compilation_cache_entries()  # a kill mid-write must not spoil the cache for later runs
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(path / "jax"))
        if jax.config.jax_compilation_cache_max_size == -1:  # JAX's default: no limit
            jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    # Every program, however quick to compile: the eager operations that initialise a model and
    # the sampler's small programs add up at start-up.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
