"""Every place gptzoo works around a dependency, in one module: what each one works around, the
upstream issue where one was found, and the test of `tests/test_workarounds.py` that fails once
the dependency no longer needs it, so that it can go.

Nothing here is imported eagerly but the standard library: the CLI reads this module before it
knows whether a command needs JAX.
"""

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


def exit_without_teardown() -> None:
    """End the process at once, output flushed, skipping Python's teardown of every module and
    object: once JAX is loaded that teardown takes a noticeable part of a short command (the XLA
    client, its threads and every compiled program are released one by one), for nothing the
    command still needs. Called from the CLI's last atexit handler, after all the others.

    Upstream: no upstream issue found. Needed while
    `test_python_teardown_with_jax_loaded_outlasts_an_immediate_exit` passes.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextmanager
def torch_hidden() -> Iterator[None]:
    """`import torch` raises ImportError inside, unless torch is loaded already: tensorboardX's
    writer imports torch at import time wherever it is installed (seconds), only to accept torch
    tensors, and gptzoo logs floats.

    Upstream: lanpa/tensorboardX#631 (tensorboardX imports PyTorch though it does not depend on
    it; closed once a missing torch stopped failing the import, an installed one is still
    loaded). Needed while `test_tensorboardx_still_imports_torch_with_its_writer` passes.
    """
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None
    try:
        yield
    finally:
        if hide:
            del sys.modules["torch"]


def orbax_arrays_without_sharding_file() -> None:
    """Make orbax write `jax.Array`s without its `_sharding` metadata file. gptzoo's restores
    always name their shardings, so the file is never read; and for arrays on a mesh its writer
    runs on past a failed save and recreates the temporary folder that the failure handling
    removed. Registered once, when `gptzoo.trainer.checkpoint` is imported.

    Upstream: no upstream issue found. Needed while
    `test_orbax_still_writes_a_sharding_file_by_default` passes.
    """
    import jax
    import orbax.checkpoint as ocp

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # the override is deliberate: no "overriding jax.Array" warning
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(enable_write_sharding_file=False),
            override=True)
    finally:
        absl.setLevel(level)


def detected_cluster() -> type | None:
    """The cluster environment (a `ClusterEnv` subclass: SLURM, Open MPI, Kubernetes, a Cloud
    TPU pod) that `jax.distributed.initialize()` would detect, or None. Only the environment is
    read; the opt-in-only detectors (mpi4py) are skipped, as `initialize()` skips them. JAX has
    no public way to ask this without initializing, so it reads the private `jax._src.clusters`.

    Upstream: no upstream issue found asking for one (jax-ml/jax#26009 asked for, and got,
    `jax.distributed.is_initialized`, which answers another question). Needed while
    `test_jax_distributed_still_has_no_public_cluster_detection` passes.
    """
    from jax._src import clusters

    return next((env for env in clusters.ClusterEnv._cluster_types
                 if not env.opt_in_only_method and env.is_env_present()), None)


def compile_past_persistent_cache(lowered):
    """`lowered.compile()` with JAX's persistent compilation cache off for the call, for a
    program that will be serialized: an executable read back from that cache serializes without
    its kernels (XLA:CPU: "Function ... not found" when the deserialized program runs). The
    setting is process-wide, so it is restored, and JAX's cache state reset, straight after.

    Upstream: no upstream issue found. Needed while
    `test_a_program_read_from_the_persistent_cache_serializes_without_its_kernels` passes.
    """
    import jax
    from jax.experimental.compilation_cache.compilation_cache import reset_cache

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    reset_cache()  # JAX decides once per process whether its cache is used
    try:
        return lowered.compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        reset_cache()


def whole_compilation_cache_entries() -> None:
    """Make JAX's persistent compilation cache survive a process killed while it writes. JAX
    writes an entry in place, then (with a size limit, which gptzoo sets) its access-time file:
    a kill in between leaves an entry cut short, which every later start reads, warns about and
    compiles again without ever replacing, or an entry without its access time, after which every
    write fails and the cache stops growing. Patched, `LRUCache.put` writes both files under
    temporary names and renames them into place (the access time first), gives an entry an earlier
    kill left without its access time one, and replaces an entry it is asked to write again (it
    is only asked after the entry could not be read). Once per process; remote cache folders
    keep JAX's own writes.

    Upstream: jax-ml/jax#39880 (an entry without its access time stops every write); no issue
    found for entries cut short. Needed while
    `test_jax_cache_still_stops_writing_once_an_entry_lost_its_access_time` passes.
    """
    import functools
    import pathlib
    import time

    from jax._src import lru_cache

    from gptzoo.atomic import write_bytes_atomic

    cache, suffix = lru_cache.LRUCache, lru_cache._CACHE_SUFFIX
    if hasattr(cache.put, "__wrapped__"):
        return

    def access_time(entry: pathlib.Path) -> pathlib.Path:
        return entry.with_name(entry.name.removesuffix(suffix) + lru_cache._ATIME_SUFFIX)

    @functools.wraps(cache.put)
    def put(self, key: str, value: bytes) -> None:
        folder = str(self.path)
        too_big = self.eviction_enabled and len(value) > self.max_size
        if not key or too_big or not lru_cache._is_local_filesystem(folder):
            return put.__wrapped__(self, key, value)  # raises, warns or writes remotely
        folder = pathlib.Path(folder.removeprefix("file://"))
        entry = folder / f"{key}{suffix}"
        if not self.eviction_enabled:
            return write_bytes_atomic(entry, value)
        self.lock.acquire(timeout=self.lock_timeout_secs)
        try:
            for kept in folder.glob(f"*{suffix}"):
                if not access_time(kept).exists():  # its modification time stands in
                    modified = kept.stat().st_mtime_ns
                    write_bytes_atomic(access_time(kept), modified.to_bytes(8, "little"))
            self._evict_if_needed(additional_size=len(value))
            write_bytes_atomic(access_time(entry), time.time_ns().to_bytes(8, "little"))
            write_bytes_atomic(entry, value)
        finally:
            self.lock.release()

    cache.put = put


def read_before_write(dependency, *values) -> tuple:
    """`values` unchanged, but computed from `dependency` (plus zero), so that XLA runs whatever
    reads their inputs (the KV cache, read for `dependency`) before it writes them in place.
    Without the dependency, XLA:CPU copies the whole cache at every decode step to keep the reads
    safe; `jax.lax.optimization_barrier` does not help, as XLA:CPU's copies are inserted past it.
    The zero is filtered to a finite one, so a non-finite `dependency` (one bad token) cannot turn
    every written key, value and position into garbage.

    Upstream: openxla/xla#20440 (copies supersede OptimizationBarrier on CPU). Needed while
    `test_xla_cpu_still_copies_a_cache_updated_without_the_read_first` passes.
    """
    import jax.numpy as jnp

    zero = jnp.zeros((), dependency.dtype) * dependency.reshape(-1)[0]
    zero = jnp.where(jnp.isfinite(zero), zero, jnp.zeros_like(zero))
    return tuple(a + zero.astype(a.dtype) for a in values)


# A larger batch decodes with the matrix product (see `rowwise_batch_computes_right`).
ROWWISE_MAX_ROWS = 128


def rowwise_batch_computes_right(n_rows: int) -> bool:
    """Whether a batch of `n_rows` may decode in the rowwise weight layout (`gptzoo.nn.rowwise`):
    under `vmap`, XLA:CPU's YNNPACK fusions (jaxlib 0.10.2; `--xla_cpu_experimental_ynn_fusion_type`
    `eltwise` or `reduce`) compute a reduction over the vocabulary (argmax, max, logsumexp) of that
    layout's multiply-reduce plus another array (the sampler's noise) wrongly from row 128 of a
    batch of more than 128 rows (each takes another row's values, so sampling drew those rows'
    tokens from the wrong logits), while the logits alone, the matrix product's and batches of up
    to 128 rows are right.

    Upstream: no upstream issue found. Needed while
    `test_ynnpack_still_miscomputes_a_vmapped_multiply_reduce_past_128_rows` passes.
    """
    return n_rows <= ROWWISE_MAX_ROWS
