"""Sampling speed with and without the KV cache, for the default char_shakespeare recipe's model
and a GPT-2-small-shaped model (random weights), through `gptzoo.sample.generate_tokens`.

    python bench/bench_sample.py [--quick]
"""

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

from gptzoo.errors import GptzooError
from gptzoo.models import gpt2
from gptzoo.recipe import load_recipe
from gptzoo.sample import CHUNK, generate_tokens

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "char_shakespeare.py"
PROMPT = np.array([0])  # one token: the longest run before learned positions reach block_size
EDGE = 100  # the first and last this many tokens of the longest cached generation


def models(quick: bool) -> dict[str, object]:
    key = jax.random.PRNGKey(0)
    if quick:
        tiny = {"model.n_layers": "1", "model.d_model": "32", "model.n_heads": "2",
                "model.block_size": "32"}
        return {"char_shakespeare, tiny": load_recipe(RECIPE, tiny).build(65, key=key),
                "GPT-2 shape, tiny": gpt2(512, n_layers=2, n_heads=2, d_model=64, block_size=64,
                                          key=key)}
    return {"char_shakespeare": load_recipe(RECIPE).build(65, key=key),
            "GPT-2 small": gpt2(50257, n_layers=12, n_heads=12, d_model=768, block_size=1024,
                                key=key)}


# Left out so that a run takes about 10 minutes on 2 cores. Without the cache every token
# recomputes a full block_size window: GPT-2 small takes ~1.6 s per token and row, so only these
# (batch -> lengths, added to the usual ones) are measured without it; and its cached 1,024 tokens
# at batch 8 took 340 s.
UNCACHED_ONLY = {"GPT-2 small": {1: (16,)}}
CACHED_SKIP = {("GPT-2 small", 8, 1024)}


def chunk_arrivals(model, batch: int, n_new: int, use_cache: bool) -> np.ndarray:
    """Seconds from the call to each chunk's arrival on the host, for a generation whose prefill
    and decode chunk were compiled by a first call that stops after one chunk."""
    def generation():
        return generate_tokens(model, [PROMPT] * batch, max_new_tokens=n_new, temperature=1.0,
                               seeds=list(range(batch)), use_cache=use_cache)

    warmup = generation()
    next(warmup)
    warmup.close()
    start, arrivals = time.perf_counter(), []
    for _ in generation():  # each chunk is a NumPy array: it has been computed
        arrivals.append(time.perf_counter() - start)
    return np.array(arrivals)


def seconds_per_token(arrivals: np.ndarray, first: int, last: int) -> float:
    """Mean seconds per generation step over tokens [first, last), each chunk's time spread
    evenly over its CHUNK tokens (the first chunk's includes the prefill)."""
    per_token = np.repeat(np.diff(arrivals, prepend=0.0) / CHUNK, CHUNK)
    return float(per_token[first:last].mean())


def cells(seconds: float | None, tokens: int) -> list[str]:
    return ["skipped"] * 2 if seconds is None else [f"{seconds:.3g}", f"{tokens / seconds:,.1f}"]


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and lengths (a smoke "
                        "test)")
    args = parser.parse_args()
    lengths, batches = ((16, 208), (1, 2)) if args.quick else ((64, 256, 1024), (1, 8))

    devices = jax.devices()
    print(f"jax {jax.__version__}, {len(devices)} x {devices[0].platform} "
          f"({devices[0].device_kind}), {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.2f} at the start (other work makes the numbers noisy)")
    print(f"Random weights, a {len(PROMPT)}-token prompt, temperature 1; tokens/s counts every "
          "row's tokens, prefill included; compilation excluded.\n")

    speed, edges = [], []
    for name, model in models(args.quick).items():
        for batch in batches:
            uncached_only = UNCACHED_ONLY.get(name, {}).get(batch)
            for n_new in sorted({*lengths, *(uncached_only or ())}):
                cached = uncached = None
                if (name, batch, n_new) not in CACHED_SKIP:
                    arrivals = chunk_arrivals(model, batch, n_new, use_cache=True)
                    cached = arrivals[-1]
                    if n_new == max(lengths):
                        first = seconds_per_token(arrivals, 0, EDGE)
                        last = seconds_per_token(arrivals, n_new - EDGE, n_new)
                        edges.append([name, str(batch), f"{1e3 * first:.2f}",
                                      f"{1e3 * last:.2f}", f"{last / first:.2f}"])
                if name not in UNCACHED_ONLY or n_new in (uncached_only or ()):
                    uncached = chunk_arrivals(model, batch, n_new, use_cache=False)[-1]
                speed.append([name, str(batch), f"{n_new:,}", *cells(cached, batch * n_new),
                              *cells(uncached, batch * n_new),
                              "" if None in (cached, uncached) else f"{uncached / cached:.1f}x"])
                print("measured:", " | ".join(speed[-1]), file=sys.stderr, flush=True)

    print_table(["model", "batch", "new tokens", "cached s", "cached tok/s", "uncached s",
                 "uncached tok/s", "cached speed-up"], speed)
    print(f"Milliseconds per generation step (all rows at once) over the first and last {EDGE} "
          f"tokens of a {max(lengths):,}-token cached generation, from chunk arrival times:\n")
    print_table(["model", "batch", f"first {EDGE}", f"last {EDGE}", "last / first"], edges)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    try:
        main()
    except GptzooError as e:
        sys.exit(f"error: {e}")
