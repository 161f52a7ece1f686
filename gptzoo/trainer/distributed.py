"""Multi-host training through `jax.distributed`: joining the cluster, which process writes the
run's files, and how the processes agree to stop.

Every process runs the same `gptzoo train`; each reads only its own rows of every batch (the
loader's `Batches.on_devices`) and the jitted step runs over all of the processes' devices as one
mesh. Process 0 writes the metrics, the recipe and tokenizer copies and `status.json`, and shows
the progress; orbax writes checkpoints from all of them together.

On CPU the processes exchange data through gloo, JAX's default CPU collectives
(`jax_cpu_collectives_implementation`), which needs nothing beyond the coordinator's address.
"""

import math
import os
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from gptzoo.data.batch_schedule import checked_schedule
from gptzoo.errors import GptzooError
from gptzoo.recipe import Recipe
from gptzoo.workarounds import detected_cluster

T = TypeVar("T")


def join_cluster(coordinator: str | None = None, num_processes: int | None = None,
                 process_id: int | None = None) -> None:
    """Call `jax.distributed.initialize` when given all three of `coordinator` ("HOST:PORT" of
    process 0), `num_processes` and `process_id`, or when none is given and JAX detects a
    cluster of more than one process; else do nothing (one process). Must come before any
    other JAX call."""
    given = {"--coordinator": coordinator, "--num-processes": num_processes,
             "--process-id": process_id}
    if all(v is None for v in given.values()):
        env = detected_cluster()
        # One task (a one-GPU SLURM job, a single-host TPU VM) needs no coordinator.
        if env is not None and env.get_process_count() > 1:
            jax.distributed.initialize()
        return
    missing = [name for name, v in given.items() if v is None]
    if missing:
        raise GptzooError(f"{', '.join(missing)} missing: pass --coordinator HOST:PORT, "
                          "--num-processes N and --process-id I together (or none of them under "
                          "SLURM, Open MPI, Kubernetes or a TPU pod, which JAX detects)")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise GptzooError(f"--coordinator {coordinator} is not HOST:PORT; pass process 0's "
                          "address and a free port, e.g. --coordinator 10.0.0.1:1234")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise GptzooError(f"--process-id {process_id} is not in 0..{num_processes - 1} "
                          f"(--num-processes {num_processes}); number the processes 0 to N-1")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def split_cpu(recipe: Recipe, log: Callable[[str], object] = print) -> None:
    """Give this process the recipe's `mesh.cpu_devices` CPU devices (JAX's
    `jax_num_cpu_devices`), or as many of them as every micro-batch splits over evenly (`log`
    says so when that is fewer). Must come before any other JAX call.

    It does nothing where the devices are already chosen: `JAX_NUM_CPU_DEVICES` or XLA's
    `--xla_force_host_platform_device_count` set them, this is one of several processes (each
    keeps one CPU device), or JAX has started (`log` says so when it started with other CPU
    devices)."""
    wanted = recipe.mesh.cpu_devices
    if (wanted == 1 or jax.distributed.is_initialized() or jax.config.jax_num_cpu_devices != -1
            or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")):
        return
    cfg = recipe.trainer
    schedule = checked_schedule(cfg.batch_size, cfg.batch_schedule, cfg.grad_accum_steps)
    n = math.gcd(wanted, *(size // cfg.grad_accum_steps for size in schedule.sizes))
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # JAX has started: its devices are chosen
        if jax.default_backend() == "cpu" and jax.local_device_count() != n:
            log(f"mesh.cpu_devices={wanted}: JAX had already started with "
                f"{jax.local_device_count()} CPU device(s), which this run trains on (its losses "
                "match a run on other devices to rounding, not bit for bit)")
        return
    if n < wanted:
        log(f"mesh.cpu_devices={wanted} does not divide every micro-batch; the CPU is split "
            f"into {n} device(s)")


def is_main() -> bool:
    """Whether this process writes the run's files and shows its progress."""
    return jax.process_index() == 0


def main_first(make: Callable[[], T]) -> T:
    """`make()` on process 0, then on the others once it has returned: the first builds what is
    cached on disk (the corpus's token shards), the rest find it built. One process: `make()`."""
    if jax.process_count() == 1:
        return make()
    result = make() if is_main() else None
    multihost_utils.sync_global_devices("gptzoo: process 0 has run it")
    return result if is_main() else make()


def agreed_stop(caught: bool, host_sync: bool) -> bool:
    """Whether every process stops after this chunk, given whether this one `caught` a Ctrl-C.

    One process decides alone after every chunk. Many must decide alike, or one would leave
    while the others wait for it in the next step's collectives; so they decide only where the
    loop already waits for the devices (`host_sync`: its records and checkpoints), each taking
    any process's Ctrl-C as its own."""
    if jax.process_count() == 1:
        return caught
    if not host_sync:
        return False
    return bool(multihost_utils.process_allgather(np.array(caught)).any())
