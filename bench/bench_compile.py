"""Compile time of one training step against depth, layers unrolled against scanned.

    python bench/bench_compile.py [--quick] [--depths 4,12,24,48] [--d-model 128]

The default recipe's real train step (`gptzoo.trainer.prepared.prepare`: model, AdamW, the jitted
chunk of one step) at each depth, with `model.scan_layers` off and on, scanned with
`trainer.remat=full`, and scanned with `trainer.unroll_layers` (stacked, but written out).
Prints seconds to trace and lower, and to compile, per configuration.
Timings on a shared machine are noisy: compare rows of one run.
"""

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from gptzoo.recipe import load_recipe
from gptzoo.trainer.prepared import prepare

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "char_shakespeare.py"

# (model.scan_layers, trainer.remat, trainer.unroll_layers)
CONFIGS = {"unrolled": ("false", "none", "false"), "scanned": ("true", "none", "false"),
           "scanned+remat": ("true", "full", "false"), "scanned+unroll": ("true", "none", "true")}


def compile_seconds(depth: int, d_model: int, scan: str, remat: str, unroll: str
                    ) -> tuple[float, float]:
    """(trace and lower, compile) seconds of one train step of the recipe at `depth` layers."""
    recipe = load_recipe(RECIPE, {
        "model.n_layers": str(depth), "model.d_model": str(d_model), "model.n_heads": "4",
        "model.block_size": "64", "model.scan_layers": scan, "trainer.remat": remat,
        "trainer.unroll_layers": unroll,
        "trainer.batch_size": "8", "trainer.max_steps": "10"})
    p = prepare(recipe, log=lambda *_: None)
    data = (p.train_batches.chunk(0, 1), p.train_key, jnp.int32(0))
    clock = time.perf_counter()
    lowered = p.train_chunk.lower(data, p.model, p.opt_state)
    lowering = time.perf_counter() - clock
    clock = time.perf_counter()
    lowered.compile()
    return lowering, time.perf_counter() - clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="depths 4 and 12 only")
    parser.add_argument("--depths", default="4,12,24,48", help="comma-separated layer counts")
    parser.add_argument("--d-model", type=int, default=128)
    args, _ = parser.parse_known_args()  # nox -s bench passes every script the same options
    depths = [4, 12] if args.quick else [int(d) for d in args.depths.split(",")]
    print(f"compile time of one train step, d_model={args.d_model}, block 64, batch 8, "
          f"{jax.devices()[0].platform}; seconds trace+lower / compile")
    print(f"{'layers':>6}  " + "  ".join(f"{name:>18}" for name in CONFIGS))
    for depth in depths:
        cells = []
        for config in CONFIGS.values():
            lowering, compiling = compile_seconds(depth, args.d_model, *config)
            cells.append(f"{lowering:7.2f} / {compiling:7.2f}")
        print(f"{depth:>6}  " + "  ".join(f"{c:>18}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
