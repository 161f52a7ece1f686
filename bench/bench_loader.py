"""Steps/s of the default recipe fed by the shard loader (memory maps, background thread, copy to
the device) against the old way: the whole corpus on the device, windows drawn there.

    python bench/bench_loader.py [--quick] [--set KEY=VALUE ...]

Both run the same compiled train chunk; the old path's windows come from a small jitted gather
kept here for comparison only. Rounds alternate between the two so drifting load hits both.
"""

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

from gptzoo.data import Prefetcher
from gptzoo.errors import GptzooError
from gptzoo.recipe import load_recipe, parse_overrides
from gptzoo.trainer.loop import prepare
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
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    overrides = parse_overrides(args.set)
    if args.steps_per_call is not None:
        overrides["trainer.steps_per_call"] = str(args.steps_per_call)
    recipe = load_recipe(RECIPE, overrides)
    cfg, block_size = recipe.trainer, recipe.model.block_size
    rounds, chunks = (2, 3) if args.quick else (5, 30)
    p = prepare(recipe)
    model, opt_state = eqx.filter_shard((p.model, p.opt_state), replicated(p.mesh))
    corpus_on_device = jax.device_put(p.corpus.train[0:len(p.corpus.train)], replicated(p.mesh))
    n, step = cfg.steps_per_call, 0

    def run(loader: bool) -> float:
        """Steps/s over `chunks` chunks after one untimed chunk (compilation, thread start)."""
        nonlocal model, opt_state, step
        plan = [(step + i * n, n) for i in range(chunks + 1)]
        prefetch = Prefetcher(p.train_batches, plan, chunk_sharded(p.mesh)) if loader else None
        source = iter(prefetch) if loader else (
            (s, k, on_device_windows(corpus_on_device, p.train_key, jnp.int32(s), k,
                                     cfg.batch_size, block_size)) for s, k in plan)
        clock = None
        for first, _, batches in source:
            model, opt_state, losses = p.train_chunk((batches, p.train_key, jnp.int32(first)),
                                                     model, opt_state)
            if clock is None:
                jax.block_until_ready(losses)
                clock = time.perf_counter()
        jax.block_until_ready((model, opt_state))
        if prefetch is not None:
            prefetch.close()
        step += (chunks + 1) * n
        return chunks * n / (time.perf_counter() - clock)

    print(f"jax {jax.__version__}, {len(jax.devices())} x {jax.devices()[0].platform}, "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}; {RECIPE.name}, "
          f"{rounds} rounds of {chunks} chunks x {n} steps each way")
    results = {"on-device windows (old)": [], "shard loader (new)": []}
    for _ in range(rounds):
        results["on-device windows (old)"].append(run(loader=False))
        results["shard loader (new)"].append(run(loader=True))
    for name, values in results.items():
        print(f"{name:26s} {statistics.median(values):8.2f} steps/s (median; "
              f"{', '.join(f'{v:.2f}' for v in values)})")
    old, new = (statistics.median(v) for v in results.values())
    print(f"loader overhead: {100 * (old - new) / old:+.1f}% (positive = the loader is slower)")


if __name__ == "__main__":
    try:
        main()
    except GptzooError as e:
        sys.exit(f"error: {e}")
