"""What the training loop adds to its train chunks: milliseconds per chunk from one chunk's
dispatch to the next inside `gptzoo.trainer.train` (which logs a record after every chunk here:
the sync, the metrics sinks, the progress line, the loader's hand-off), against the same chunk
timed alone, on a model small enough that this host work shows.

    python bench/bench_loop.py [--quick] [--set KEY=VALUE ...]

The difference is time the devices wait for the host at every `trainer.log_interval` steps.
"""

import argparse
import contextlib
import io
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import jax
from bench_train import chunk_timer

import gptzoo.trainer.loop as loop
from gptzoo.errors import GptzooError
from gptzoo.recipe import load_recipe, parse_overrides
from gptzoo.trainer.progress import Reporter

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "char_shakespeare.py"
SMALL = {"model.n_layers": "1", "model.d_model": "32", "model.n_heads": "2",
         "model.block_size": "32", "trainer.batch_size": "4", "trainer.eval_interval": "1000000",
         "trainer.checkpoint_interval": "1000000", "trainer.log_interval": "10",
         "trainer.steps_per_call": "10"}


def loop_chunk_ms(recipe) -> list[float]:
    """ms from each train chunk's dispatch to the next's in `train()` (the first two, which
    compile and warm up, left out)."""
    stamps, prepare = [], loop.prepare

    def timed_prepare(*args, **kwargs):
        p = prepare(*args, **kwargs)
        chunk = p.train_chunk

        def timed_chunk(*chunk_args):
            stamps.append(time.perf_counter())
            return chunk(*chunk_args)

        p.train_chunk = timed_chunk
        return p

    # Its lines printed as to a log file (a terminal's progress bar redraws on its own thread).
    with (tempfile.TemporaryDirectory() as run_dir,
          mock.patch.object(loop, "prepare", timed_prepare),
          contextlib.redirect_stdout(io.StringIO())):
        loop.train(recipe, run_dir, reporter=Reporter(recipe.trainer.max_steps, 0))
    return [1e3 * (b - a) for a, b in itertools.pairwise(stamps[2:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer chunks (a smoke test)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    chunks = 30 if args.quick else 300
    recipe = load_recipe(RECIPE, {**SMALL, "trainer.max_steps": str(10 * (chunks + 3)),
                                  **parse_overrides(args.set)})
    in_loop = loop_chunk_ms(recipe)
    p = loop.prepare(recipe, log=lambda *_: None)
    run = chunk_timer(p, recipe.trainer.steps_per_call)
    run(), run()  # compile, warm up
    alone = [1e3 * run() for _ in range(chunks)]
    n = recipe.trainer.steps_per_call
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; {RECIPE.name} with {SMALL} "
          f"and {args.set or 'no other overrides'}; {chunks} chunks of {n} steps each way")
    loop_ms, alone_ms = statistics.median(in_loop), statistics.median(alone)
    print(f"ms per chunk, medians: in train() {loop_ms:.2f}, alone {alone_ms:.2f}; the loop's "
          f"host work at each log step: {loop_ms - alone_ms:.2f} ms")


if __name__ == "__main__":
    try:
        main()
    except GptzooError as e:
        sys.exit(f"error: {e}")
