"""Training and sampling speed of gptzoo's own train chunk, for the default char_shakespeare recipe
and nanoGPT's two CPU comparison shapes; then, with torch installed, one layer's attention forward
+ backward and the step's matrix products in XLA and in torch. These share one process, so
they only locate differences; the training speed against nanoGPT is bench_vs_nanogpt.py's,
each side in a process of its own.

    python bench/bench_train.py [--quick] [--steps-per-call N] [--set KEY=VALUE ...]
"""

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gptzoo.errors import GptzooError
from gptzoo.recipe import Recipe, load_recipe, parse_overrides
from gptzoo.sample import stream
from gptzoo.trainer.distributed import split_cpu
from gptzoo.trainer.flops import count_parameters
from gptzoo.trainer.prepared import prepare
from gptzoo.trainer.sharding import chunk_sharded, replicated

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "char_shakespeare.py"
NANOGPT_SHAPES = {
    "nanoGPT 4x128 ctx 64": {"model.n_layers": "4", "model.n_heads": "4", "model.d_model": "128",
                             "model.block_size": "64", "trainer.batch_size": "12"},
    "nanoGPT 6x384 ctx 256": {"model.n_layers": "6", "model.n_heads": "6", "model.d_model": "384",
                              "model.block_size": "256", "trainer.batch_size": "8"},
}
CONFIGS = {"default recipe": {}, **NANOGPT_SHAPES}
SAMPLE_TOKENS = 200


def chunk_timer(p, n: int):
    """`run_chunk() -> seconds` of one call (n steps) of the train chunk of prepared training `p`;
    its model and optimizer state are donated to the chunk."""
    model, opt_state = eqx.filter_shard((p.model, p.opt_state), replicated(p.mesh))
    step = 0

    def run_chunk() -> float:
        """One chunk's compute; its batches are read before the clock starts (the loader's own
        cost, overlapped with compute in training, is bench_loader.py's subject)."""
        nonlocal model, opt_state, step
        batches = jax.device_put(p.train_batches.chunk(step, n), chunk_sharded(p.mesh))
        jax.block_until_ready(batches)
        clock = time.perf_counter()
        model, opt_state, losses = p.train_chunk((batches, p.train_key, np.int32(step)),
                                                 model, opt_state)
        jax.block_until_ready((model, opt_state, losses))
        step += n
        return time.perf_counter() - clock

    return run_chunk


def bench(recipe: Recipe, warmup: int, chunks: int, samples: int) -> dict:
    """Set training up as `gptzoo.trainer.loop.train` does, then time its train chunk."""
    cfg, block_size = recipe.trainer, recipe.model.block_size
    p = prepare(recipe)
    model, tokenizer = p.model, p.tokenizer
    n_params = count_parameters(model)

    # Sampling first: the random model is donated to the train chunk below.
    def sample() -> float:
        clock = time.perf_counter()
        for _ in stream(model, tokenizer, max_new_tokens=SAMPLE_TOKENS):
            pass
        return time.perf_counter() - clock

    sample()  # compiles prefill and decode
    sample_seconds = statistics.median(sample() for _ in range(samples))

    n = cfg.steps_per_call
    run_chunk = chunk_timer(p, n)
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


def attention_micro(shape: tuple[int, int, int, int], rounds: int) -> dict:
    """ms of one layer's causal attention forward + backward (batch, seq, heads, head_dim) on each
    path, and through torch's `scaled_dot_product_attention` (nanoGPT's), interleaved rounds,
    medians."""
    import torch

    import gptzoo.nn.attention as attention

    q, k, v, cotangent = jax.random.normal(jax.random.PRNGKey(0), (4, *shape))
    seq = shape[1]
    ours = attention.causal_attend
    paths = {"einsum": (ours, seq), "blocks of 32": (ours, 32), "blocks of 64": (ours, 64),
             "dot_product_attention xla": (functools.partial(
                 jax.nn.dot_product_attention, is_causal=True, implementation="xla"), seq)}
    grads = {}
    for name, (attend, block) in paths.items():
        grads[name] = jax.jit(jax.grad(lambda q, k, v, f=attend: jnp.sum(f(q, k, v) * cotangent),
                                       argnums=(0, 1, 2)))
        # Traced (compiled) under the block size asked for; a block of seq is the plain einsum.
        with mock.patch.multiple(attention, BLOCK=block, MIN_BLOCKED_QUERIES=1):
            jax.block_until_ready(grads[name](q, k, v))
    runs = {name: lambda grad=grad: jax.block_until_ready(grad(q, k, v))
            for name, grad in grads.items()}
    # torch's layout is (batch, heads, seq, head_dim), as nanoGPT transposes to.
    tq, tk, tv, tcot = (torch.from_numpy(np.array(a)).transpose(1, 2).contiguous()
                        for a in (q, k, v, cotangent))
    tq, tk, tv = (t.requires_grad_() for t in (tq, tk, tv))

    def torch_sdpa() -> None:
        out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
        torch.autograd.grad((out * tcot).sum(), (tq, tk, tv))

    runs["torch sdpa"] = torch_sdpa
    torch_sdpa()  # warm-up
    ms = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            clock = time.perf_counter()
            run()
            ms[name].append(1e3 * (time.perf_counter() - clock))
    return {name: statistics.median(t) for name, t in ms.items()}


CALLS = 10  # products per timed round of matmul_micro


def matmul_micro(m: int, k: int, n: int, rounds: int) -> dict:
    """GFLOP/s of one float32 (m, k) @ (k, n) product in XLA and in torch, interleaved rounds of
    `CALLS` products each: how far the training step is from its matrix products alone. Each
    product reuses its output buffer, as a compiled step's products do (torch through `out=`):
    given a fresh output per product (one call a round, or ten kept alive), XLA read up to 40%
    slower on the 2-core CPU (79 against 133 GFLOP/s for 2048 x 384 x 1152), the price of first
    touching new memory, which this bench once reported as XLA's rate."""
    import torch

    a, b = (np.random.default_rng(0).standard_normal(s, np.float32) for s in [(m, k), (k, n)])
    xla_matmul, xa, xb = jax.jit(jnp.matmul), jnp.asarray(a), jnp.asarray(b)
    ta, tb, out = torch.from_numpy(a), torch.from_numpy(b), torch.empty(m, n)

    def xla() -> None:
        for _ in range(CALLS):
            product = xla_matmul(xa, xb)  # the last one's buffer is reused, as in a step
        jax.block_until_ready(product)

    def torch_matmul() -> None:
        for _ in range(CALLS):
            torch.matmul(ta, tb, out=out)

    runs = {"xla": xla, "torch": torch_matmul}
    seconds = {name: [] for name in runs}
    for _ in range(rounds + 1):  # the first round compiles and warms up
        for name, run in runs.items():
            clock = time.perf_counter()
            run()
            seconds[name].append((time.perf_counter() - clock) / CALLS)
    return {name: 2 * m * k * n / statistics.median(s[1:]) / 1e9 for name, s in seconds.items()}


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
    parser.add_argument("--compare-only", action="store_true",
                        help="skip the table: only the nanoGPT and attention comparisons")
    parser.add_argument("--steps-per-call", type=int, help="override trainer.steps_per_call")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override applied to both configurations (repeatable)")
    args = parser.parse_args()
    # torch.compile forks workers: a block-buffered stdout would be printed again by each.
    sys.stdout.reconfigure(line_buffering=True)
    extra = parse_overrides(args.set)
    if args.steps_per_call is not None:
        extra["trainer.steps_per_call"] = str(args.steps_per_call)
    recipes = {name: load_recipe(RECIPE, {**overrides, **extra})
               for name, overrides in CONFIGS.items()}
    warmup, chunks, samples = (1, 3, 1) if args.quick else (3, 30, 5)
    rounds = 3 if args.quick else 15

    split_cpu(recipes["default recipe"])  # as `gptzoo train` does (batches 32, 12 and 8 split)
    devices = jax.devices()
    print(f"jax {jax.__version__}, {len(devices)} x {devices[0].platform} "
          f"({devices[0].device_kind}), {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.2f} (other work makes the numbers noisy)")
    print(f"{RECIPE.name}; extra overrides: {extra or 'none'}; {chunks} timed chunks after "
          f"{warmup} warm-up; sampling {SAMPLE_TOKENS} tokens, median of {samples}\n")
    if not args.compare_only:
        print_table({name: bench(recipe, warmup, chunks, samples)
                     for name, recipe in recipes.items()})
    try:
        import torch  # noqa: F401
    except ImportError:
        print("\nnanoGPT comparison skipped: torch is missing (pip install -e .[test])")
        return
    print(f"\none layer's causal attention forward + backward, ms, medians of {rounds} rounds")
    for shape in [(12, 64, 4, 32), (8, 256, 6, 64)]:
        print(f"batch, seq, heads, head_dim {shape}: " + ", ".join(
            f"{k} {v:.1f}" for k, v in attention_micro(shape, rounds).items()))
    print(f"\nfloat32 matrix products of the 6x384 shape's step (2,048 rows), GFLOP/s, "
          f"medians of {rounds} rounds")
    for shape in [(2048, 384, 1152), (2048, 384, 1536), (2048, 1536, 384)]:
        print(f"{' x '.join(map(str, shape))}: " + ", ".join(
            f"{k} {v:.0f}" for k, v in matmul_micro(*shape, 5 * rounds).items()))
    for name, recipe in recipes.items():
        if recipe.trainer.steps_per_call > recipe.trainer.log_interval:
            print(f"note ({name}): training also ends a chunk every trainer.log_interval="
                  f"{recipe.trainer.log_interval} steps, so its calls run fewer steps than here")


if __name__ == "__main__":
    try:
        main()
    except GptzooError as e:
        sys.exit(f"error: {e}")
