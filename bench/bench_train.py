"""Training and sampling speed of gptzoo's own train chunk, for the default char_shakespeare recipe
and nanoGPT's CPU comparison shape.

    python bench/bench_train.py [--quick] [--steps-per-call N] [--set KEY=VALUE ...]
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

from gptzoo.errors import GptzooError
from gptzoo.recipe import Recipe, load_recipe, parse_overrides
from gptzoo.sample import stream
from gptzoo.trainer.loop import prepare
from gptzoo.trainer.sharding import chunk_sharded, replicated

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "char_shakespeare.py"
CONFIGS = {
    "default recipe": {},
    "nanoGPT shape": {"model.n_layers": "4", "model.n_heads": "4", "model.d_model": "128",
                      "model.block_size": "64", "trainer.batch_size": "12"},
}
SAMPLE_TOKENS = 200


def bench(recipe: Recipe, warmup: int, chunks: int, samples: int) -> dict:
    """Set training up as `gptzoo.trainer.loop.train` does, then time its train chunk."""
    cfg, block_size = recipe.trainer, recipe.model.block_size
    p = prepare(recipe)
    model, tokenizer = p.model, p.tokenizer
    n_params = sum(a.size for a in jax.tree.leaves(eqx.filter(model, eqx.is_array)))

    # Sampling first: the random model is donated to the train chunk below.
    def sample() -> float:
        clock = time.perf_counter()
        for _ in stream(model, tokenizer, max_new_tokens=SAMPLE_TOKENS):
            pass
        return time.perf_counter() - clock

    sample()  # compiles prefill and decode
    sample_seconds = statistics.median(sample() for _ in range(samples))

    model, opt_state = eqx.filter_shard((model, p.opt_state), replicated(p.mesh))
    train_chunk, train_key = p.train_chunk, p.train_key
    n, step = cfg.steps_per_call, 0

    def run_chunk() -> float:
        """One chunk's compute; its batches are read before the clock starts (the loader's own
        cost, overlapped with compute in training, is bench_loader.py's subject)."""
        nonlocal model, opt_state, step
        batches = jax.device_put(p.train_batches.chunk(step, n), chunk_sharded(p.mesh))
        jax.block_until_ready(batches)
        clock = time.perf_counter()
        model, opt_state, losses = train_chunk((batches, train_key, jnp.int32(step)),
                                               model, opt_state)
        jax.block_until_ready((model, opt_state, losses))
        step += n
        return time.perf_counter() - clock

    compile_seconds = run_chunk()
    for _ in range(warmup):
        run_chunk()
    step_seconds = [run_chunk() / n for _ in range(chunks)]
    tokens_per_step = cfg.batch_size * block_size
    median, best = statistics.median(step_seconds), min(step_seconds)
    return {"params": n_params, "steps/call": n, "compile s": compile_seconds,
            "ms/step med": 1e3 * median, "ms/step min": 1e3 * best,
            "tok/s med": tokens_per_step / median, "tok/s best": tokens_per_step / best,
            "sample tok/s": SAMPLE_TOKENS / sample_seconds}


def print_table(rows: dict[str, dict]) -> None:
    formats = {"params": "{:,}", "steps/call": "{}", "compile s": "{:.1f}", "ms/step med": "{:.1f}",
               "ms/step min": "{:.1f}", "tok/s med": "{:,.0f}", "tok/s best": "{:,.0f}",
               "sample tok/s": "{:,.0f}"}
    cells = [["config", *formats]]
    cells += [[name, *(f.format(row[k]) for k, f in formats.items())] for name, row in rows.items()]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    for i, line in enumerate(cells):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                        for j, (c, w) in enumerate(zip(line, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke test)")
    parser.add_argument("--steps-per-call", type=int, help="override trainer.steps_per_call")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override applied to both configurations (repeatable)")
    args = parser.parse_args()
    extra = parse_overrides(args.set)
    if args.steps_per_call is not None:
        extra["trainer.steps_per_call"] = str(args.steps_per_call)
    recipes = {name: load_recipe(RECIPE, {**overrides, **extra})
               for name, overrides in CONFIGS.items()}
    warmup, chunks, samples = (1, 3, 1) if args.quick else (3, 30, 5)

    devices = jax.devices()
    print(f"jax {jax.__version__}, {len(devices)} x {devices[0].platform} "
          f"({devices[0].device_kind}), {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.2f} (other work makes the numbers noisy)")
    print(f"{RECIPE.name}; extra overrides: {extra or 'none'}; {chunks} timed chunks after "
          f"{warmup} warm-up; sampling {SAMPLE_TOKENS} tokens, median of {samples}\n")
    print_table({name: bench(recipe, warmup, chunks, samples) for name, recipe in recipes.items()})
    for name, recipe in recipes.items():
        if recipe.trainer.steps_per_call > recipe.trainer.log_interval:
            print(f"note ({name}): training also ends a chunk every trainer.log_interval="
                  f"{recipe.trainer.log_interval} steps, so its calls run fewer steps than here")


if __name__ == "__main__":
    try:
        main()
    except GptzooError as e:
        sys.exit(f"error: {e}")
