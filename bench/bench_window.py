"""Sliding-window attention against full causal attention, on the CPU.

    python bench/bench_window.py [--quick] [--seq 1024] [--window 128] [--rounds 15]

1. Training: one layer's attention forward + backward (`nn.causal_attend`, queries, keys and
   values in; and the whole `CausalSelfAttention` with its projections) at `--seq` positions,
   the loss's value computed with its gradients, as a training step does (with the gradients
   alone the forward's output is unused and compiled away: only the backward would be timed),
   banded to `--window` against full causal, in interleaved rounds (banded, full, banded, ...);
   prints each one's median ms and the median of the rounds' ratios (load that comes and goes
   cancels within a round). The issue's bar: at least 3x at T = 1,024, W = 128.
2. Decoding: bytes of one layer's KV cache with the rolling cache of `window` slots against a
   cache of the whole context, for this layer and for Mistral 7B's (8 key/value heads of 128,
   window 4,096, context 32,768, bfloat16); and ms of one decoded token at a late position with
   each, which stays flat past the window for the rolling cache.
"""

import argparse
import statistics
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from gptzoo import nn

BATCH, HEADS, HEAD_DIM = 4, 4, 64


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return 1000 * (time.perf_counter() - start)


def interleaved(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """ms of each run per round, the runs alternating within each round; one warm-up each."""
    for run in runs.values():
        jax.block_until_ready(run())
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(timed(run))
    return times


def report(title: str, times: dict[str, list[float]]) -> None:
    (banded_name, banded), (full_name, full) = times.items()
    ratio = statistics.median(f / b for f, b in zip(full, banded, strict=True))
    print(f"{title}: {banded_name} {statistics.median(banded):.1f} ms, {full_name} "
          f"{statistics.median(full):.1f} ms (medians of {len(banded)}); {ratio:.2f}x faster")


def attention_runs(seq: int, window: int) -> dict[str, Callable[[], object]]:
    q, k, v, cotangent = jax.random.normal(jax.random.PRNGKey(0), (4, BATCH, seq, HEADS, HEAD_DIM))

    def step(w):
        loss = lambda q, k, v: jnp.sum(nn.causal_attend(q, k, v, window=w) * cotangent)  # noqa: E731
        forward_backward = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        return lambda: forward_backward(q, k, v)

    return {f"window {window}": step(window), "full causal": step(None)}


def layer_runs(seq: int, window: int) -> dict[str, Callable[[], object]]:
    d_model = HEADS * HEAD_DIM
    x, cotangent = jax.random.normal(jax.random.PRNGKey(1), (2, BATCH, seq, d_model))

    def step(w):
        layer = nn.CausalSelfAttention(d_model, HEADS, window=w, key=jax.random.PRNGKey(2))
        forward_backward = eqx.filter_jit(
            eqx.filter_value_and_grad(lambda m: jnp.sum(m(x) * cotangent)))
        return lambda: forward_backward(layer)

    return {f"window {window}": step(window), "full causal": step(None)}


def cache_bytes(layer: nn.CausalSelfAttention, context: int) -> int:
    """Bytes of `layer.init_cache(context)`, from shapes alone (nothing is allocated)."""
    shapes = jax.eval_shape(lambda: layer.init_cache(context))
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes))


def mistral_7b_layer(window: int | None) -> nn.CausalSelfAttention:
    """Mistral 7B's attention in bfloat16, as shapes only."""
    def build():
        layer = nn.CausalSelfAttention(4096, 32, n_kv_heads=8, window=window,
                                       key=jax.random.PRNGKey(0))
        return jax.tree.map(lambda a: a.astype(jnp.bfloat16) if eqx.is_inexact_array(a) else a,
                            layer)
    return jax.eval_shape(build)


def decode_memory(seq: int, window: int) -> None:
    ours = [nn.CausalSelfAttention(HEADS * HEAD_DIM, HEADS, window=w, key=jax.random.PRNGKey(3))
            for w in (window, None)]
    rolling, full = (cache_bytes(a, seq) for a in ours)
    print(f"KV cache of this layer at {seq} positions: rolling {rolling / 1024:.0f} KiB, whole "
          f"context {full / 1024:.0f} KiB ({full / rolling:.1f}x)")
    rolling, full = (cache_bytes(mistral_7b_layer(w), 32768) for w in (4096, None))
    print(f"Mistral 7B's KV cache per layer and sequence (bfloat16, context 32,768): rolling "
          f"{rolling / 2**20:.0f} MiB, whole context {full / 2**20:.0f} MiB "
          f"({full / rolling:.0f}x)")


def filled(cache, end: int):
    """`cache` holding the positions before `end` that it has room for (keys and values left at
    zero: only the time of a step matters here)."""
    held = jnp.arange(end - cache.size, end)
    positions = jnp.zeros_like(cache.positions).at[held % cache.size].set(held)
    return eqx.tree_at(lambda c: c.positions, cache, positions)


def decode_time(seq: int, window: int, rounds: int) -> None:
    """One token at position `4 * seq - 1` over a rolling cache against a cache of `4 * seq`
    slots."""
    context = 4 * seq
    x = jax.random.normal(jax.random.PRNGKey(4), (1, HEADS * HEAD_DIM))
    step = eqx.filter_jit(lambda layer, cache: layer.decode(x, jnp.array([context - 1]), cache))
    runs = {}
    for name, w in ((f"window {window}", window), ("full causal", None)):
        layer = nn.CausalSelfAttention(HEADS * HEAD_DIM, HEADS, window=w, key=jax.random.PRNGKey(5))
        cache = filled(layer.init_cache(context), context - 1)
        runs[name] = lambda layer=layer, cache=cache: step(layer, cache)
    report(f"one decoded token at position {context - 1}", interleaved(runs, 10 * rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke test)")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    args, _ = parser.parse_known_args()  # nox -s bench passes every script the same options
    rounds = 2 if args.quick else args.rounds
    print(f"{jax.default_backend()}, batch {BATCH}, {HEADS} heads of {HEAD_DIM}, "
          f"{args.seq} positions")
    report("attention forward + backward", interleaved(attention_runs(args.seq, args.window),
                                                        rounds))
    report("attention layer (with projections) forward + backward",
           interleaved(layer_runs(args.seq, args.window), rounds))
    decode_memory(args.seq, args.window)
    decode_time(args.seq, args.window, rounds)


if __name__ == "__main__":
    main()
