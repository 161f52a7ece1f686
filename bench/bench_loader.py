"""Steps/s of the default recipe fed by the shard loader (memory maps, background thread, copy to
the device) against the old way: the whole corpus on the device, windows drawn there.

    python bench/bench_loader.py [--quick] [--set KEY=VALUE ...]

Both run the same compiled train chunk; the old path's windows come from a small jitted gather
kept here for comparison only. Rounds alternate between the two so drifting load hits both. Besides
steps/s (wall clock: other programs on the machine move it), it prints the CPU milliseconds the
process spends per step, which other programs move much less, and the loader thread's own share.
"""

import argparse
import functools
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gptzoo.data import Prefetcher
from gptzoo.errors import GptzooError
from gptzoo.recipe import load_recipe, parse_overrides
from gptzoo.trainer.prepared import prepare
from gptzoo.trainer.sharding import chunk_sharded, replicated

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "char_shakespeare.py"


@functools.partial(jax.jit, static_argnames=("n_steps", "batch_size", "block_size"))
def on_device_windows(tokens, key, start, n_steps: int, batch_size: int, block_size: int):
    """The pre-loader path: `n_steps` batches of random windows gathered on the device."""

    def one(step):
        k = jax.random.fold_in(key, step)
        starts = jax.random.randint(k, (batch_size,), 0, tokens.shape[0] - block_size)
        return tokens[starts[:, None] + jnp.arange(block_size + 1)[None, :]]

    return jax.vmap(one)(start + jnp.arange(n_steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke test)")
    parser.add_argument("--steps-per-call", type=int, help="override trainer.steps_per_call")
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the two ways")
    parser.add_argument("--chunks", type=int, default=30, help="timed chunks per way and round")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    overrides = parse_overrides(args.set)
    if args.steps_per_call is not None:
        overrides["trainer.steps_per_call"] = str(args.steps_per_call)
    recipe = load_recipe(RECIPE, overrides)
    cfg, block_size = recipe.trainer, recipe.model.block_size
    rounds, chunks = (2, 3) if args.quick else (args.rounds, args.chunks)
    p = prepare(recipe)
    model, opt_state = eqx.filter_shard((p.model, p.opt_state), replicated(p.mesh))
    corpus_on_device = jax.device_put(p.corpus.train[0:len(p.corpus.train)], replicated(p.mesh))
    n, step = cfg.steps_per_call, 0

    def run(loader: bool) -> tuple[float, float]:
        """Steps/s and CPU ms per step over `chunks` chunks after one untimed chunk
        (compilation, thread start)."""
        nonlocal model, opt_state, step
        plan = [(step + i * n, n) for i in range(chunks + 1)]
        prefetch = Prefetcher(p.train_batches, plan, chunk_sharded(p.mesh)) if loader else None
        source = iter(prefetch) if loader else (
            (s, k, on_device_windows(corpus_on_device, p.train_key, jnp.int32(s), k,
                                     cfg.batch_size, block_size)) for s, k in plan)
        clock = None
        for first, _, batches in source:
            model, opt_state, losses = p.train_chunk((batches, p.train_key, np.int32(first)),
                                                     model, opt_state)
            if clock is None:
                jax.block_until_ready(losses)
                clock, cpu = time.perf_counter(), cpu_seconds()
        jax.block_until_ready((model, opt_state))
        seconds, cpu = time.perf_counter() - clock, cpu_seconds() - cpu
        if prefetch is not None:
            prefetch.close()
        step += (chunks + 1) * n
        return chunks * n / seconds, 1e3 * cpu / (chunks * n)

    print(f"jax {jax.__version__}, {len(jax.devices())} x {jax.devices()[0].platform}, "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}; {RECIPE.name}, "
          f"{rounds} rounds of {chunks} chunks x {n} steps each way")
    results = {"on-device windows (old)": [], "shard loader (new)": []}
    for _ in range(rounds):
        results["on-device windows (old)"].append(run(loader=False))
        results["shard loader (new)"].append(run(loader=True))
    for name, values in results.items():
        speeds, cpus = zip(*values, strict=True)
        print(f"{name:26s} {statistics.median(speeds):8.2f} steps/s (median; "
              f"{', '.join(f'{v:.2f}' for v in speeds)}); {statistics.median(cpus):7.1f} CPU "
              f"ms/step (median; {', '.join(f'{v:.1f}' for v in cpus)})")
    (old, old_cpu), (new, new_cpu) = ([statistics.median(c) for c in zip(*v, strict=True)]
                                      for v in results.values())
    print(f"loader overhead: {100 * (old - new) / old:+.1f}% steps/s, "
          f"{100 * (new_cpu - old_cpu) / old_cpu:+.1f}% CPU per step (positive = the loader costs "
          "more)")
    reading = loader_cpu_per_chunk(p.train_batches, n, chunk_sharded(p.mesh))
    print(f"the loader thread's own work: {1e3 * reading:.2f} CPU ms per chunk of {n} steps "
          f"({100 * reading / (n * new_cpu / 1e3):.2f}% of the chunk's CPU time)")


def cpu_seconds() -> float:
    """CPU time of this process, all threads (XLA's and the loader's)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def loader_cpu_per_chunk(batches, n: int, sharding, repeats: int = 50) -> float:
    """CPU seconds the Prefetcher's thread spends per chunk: read the windows from the memory
    maps and copy them to the device, timed on this thread alone."""
    clock = time.thread_time()
    for i in range(repeats):
        jax.block_until_ready(jax.device_put(batches.chunk(i * n, n), sharding))
    return (time.thread_time() - clock) / repeats


if __name__ == "__main__":
    try:
        main()
    except GptzooError as e:
        sys.exit(f"error: {e}")
