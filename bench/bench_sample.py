"""Sampling speed against the machine's memory-bandwidth bound, through
`gptzoo.sample.generate_tokens`, and `gptzoo sample` end to end against nanoGPT.

    python bench/bench_sample.py [--quick]

Every figure is printed, none asserted; the targets of issue 11 are printed beside them.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

from gptzoo.errors import GptzooError
from gptzoo.models import gpt2
from gptzoo.nn.rowwise import rowwise_product
from gptzoo.recipe import load_recipe
from gptzoo.sample import generate_tokens

ROOT = Path(__file__).resolve().parents[1]
PROMPT = np.array([0])  # one token: the longest run inside the window


def bandwidth() -> float:
    """Bytes per second of a 256 MB array copy (read + write), the best of five."""
    a = np.ones(64 * 2 ** 20, np.float32)
    b = np.empty_like(a)
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(5))
    return 2 * a.nbytes / best


def _timed(f) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def shapes(quick: bool) -> dict[str, object]:
    key = jax.random.PRNGKey(0)
    if quick:
        return {"6-layer char": gpt2(65, n_layers=2, n_heads=2, d_model=64, block_size=64,
                                     use_bias=False, key=key),
                "GPT-2 small": gpt2(512, n_layers=2, n_heads=2, d_model=64, block_size=128,
                                    key=key)}
    return {"6-layer char": gpt2(65, n_layers=6, n_heads=6, d_model=384, block_size=256,
                                 use_bias=False, key=key),
            "GPT-2 small": gpt2(50257, n_layers=12, n_heads=12, d_model=768, block_size=1024,
                                key=key)}


def bytes_per_step(model, batch: int, n_new: int) -> int:
    """The weights once, and each row's KV cache as far as it is filled, on average over a run of
    `n_new` tokens after `PROMPT`: what a step must read (the sampler reads the filled part
    rounded up to a half, a quarter, ... of the window, or the whole cache where it is small
    beside the weights: `gptzoo.sample.layout.reads_by_extent`)."""
    weights = sum(a.nbytes for a in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    cache = sum(a.nbytes for a in jax.tree.leaves(model.init_cache()))
    filled = min(len(PROMPT) + n_new / 2, model.block_size) / model.block_size
    return int(weights + batch * cache * filled)


def tokens_per_s(model, batch: int, n_new: int, repeats: int = 3, **kwargs) -> float:
    """All rows' tokens per second of a generation whose programs a first call compiled: the
    best of `repeats` generations, as the bandwidth is the best of its copies (single runs on the
    2-core machine varied by up to a third)."""
    def generation(n):
        return generate_tokens(model, [PROMPT] * batch, max_new_tokens=n, temperature=1.0,
                               seeds=list(range(batch)), **kwargs)
    for _ in generation(n_new):  # compiles the prefill and a decode chunk per cache extent
        pass
    return batch * n_new / min(_timed(lambda: [*generation(n_new)]) for _ in range(repeats))


def table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |", flush=True)
    print()


def decoding(models: dict, bw: float, quick: bool) -> dict:
    """Tokens/s per model and batch inside the window, beside the bandwidth bound."""
    lengths = {"6-layer char": 16 if quick else 200, "GPT-2 small": 16 if quick else 48}
    rows, speed = [], {}
    for name, model in models.items():
        for batch in (1, 8):
            rate = tokens_per_s(model, batch, lengths[name])
            step_bytes = bytes_per_step(model, batch, lengths[name])
            bound = batch * bw / step_bytes
            speed[name, batch] = rate
            rows.append([name, str(batch), f"{step_bytes / 1e6:,.0f}",
                         f"{bound:,.0f}", f"{rate:,.1f}", f"{rate / bound:.0%}"])
    table(["model", "batch", "MB read per step", "bound tok/s", "tok/s", "of bound"], rows)
    return speed


def ratios(models: dict, speed: dict, quick: bool) -> None:
    char = models["6-layer char"]
    n = 16 if quick else 100
    cached = tokens_per_s(char, 1, n)
    uncached = tokens_per_s(char, 1, n, use_cache=False)
    for name, value, target in [
            ("6-layer char in-window cached / --no-cache", cached / uncached, 10),
            ("6-layer char batch 8 / batch 1 total tok/s",
             speed["6-layer char", 8] / speed["6-layer char", 1], 5),
            ("GPT-2 small batch 8 / batch 1 total tok/s",
             speed["GPT-2 small", 8] / speed["GPT-2 small", 1], 5)]:
        print(f"{name}: {value:.1f}x (target >= {target}x)")
    print()


def weight_products(quick: bool) -> None:
    """What the batch-8 ratio is made of: XLA's time for 8 rows times one weight matrix, over
    its time for one row (the decode step is mostly such products); and the same 8 rows as the
    sampler multiplies them on CPU, each row by the weight stored (out, in)
    (`nn.rowwise_layout`)."""
    for k, n in [(64, 256)] if quick else [(384, 1536), (768, 3072), (768, 50257)]:
        weight = jax.random.normal(jax.random.PRNGKey(0), (k, n))
        one, eight = _product_seconds(weight, 1), _product_seconds(weight, 8)
        rowwise = _product_seconds(weight, 8, rowwise=True)
        print(f"8 rows x ({k}, {n}) weights: {eight / one:.1f}x the time of 1 row, "
              f"{rowwise / one:.1f}x as nn.rowwise "
              f"({weight.nbytes / one / 1e9:.1f} GB/s of weights at 1 row, "
              f"{weight.nbytes / eight / 1e9:.1f} at 8, "
              f"{weight.nbytes / rowwise / 1e9:.1f} rowwise)")
    print()


def _product_seconds(weight: jax.Array, rows: int, rowwise: bool = False,
                     repeats: int = 20) -> float:
    """Seconds of one jitted `x @ weight` for `rows` rows, the best of five runs; with `rowwise`,
    each row (vmapped, as in a decode step) through `rowwise_product` with the weight transposed."""
    if rowwise:
        weight = weight.T  # eager: a new array, laid out (out, in)
        product = jax.jit(jax.vmap(lambda x, w: rowwise_product(x[None], w), in_axes=(0, None)))
    else:
        product = jax.jit(lambda x, w: x @ w)
    x = jax.numpy.ones((rows, weight.shape[1] if rowwise else weight.shape[0]))
    product(x, weight).block_until_ready()

    def run() -> None:
        for _ in range(repeats):
            out = product(x, weight)
        out.block_until_ready()

    return min(_timed(run) for _ in range(5)) / repeats


def train_run(run_dir: Path, quick: bool) -> None:
    """A run of the 6-layer, 256-context learned-position shape (a few steps: speed only)."""
    overrides = {"trainer.max_steps": "2", "trainer.batch_size": "2", "trainer.eval_interval": "2",
                 "trainer.eval_steps": "1", "trainer.checkpoint_interval": "2",
                 "trainer.log_interval": "1", "trainer.steps_per_call": "1"}
    if quick:
        overrides.update({"model.n_layers": "1", "model.d_model": "32", "model.n_heads": "2",
                          "model.block_size": "32"})
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    subprocess.run([sys.executable, "-m", "gptzoo", "train",
                    ROOT / "recipes" / "char_shakespeare_gpu.py", *sets, "--run-dir", run_dir],
                   check=True, capture_output=True, env=os.environ | {"JAX_PLATFORMS": "cpu"})


def sample_process(run_dir: Path, cache_dir: Path, n: int) -> tuple[float, float]:
    """Seconds from process start to the first generated character, and to exit."""
    env = os.environ | {"GPTZOO_COMPILE_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1",
                        "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "gptzoo",
                                "sample", "--ckpt", run_dir, "--prompt", "ROMEO:",
                                "--max-new-tokens", str(n)], stdout=subprocess.PIPE, env=env)
    process.stdout.read(len("ROMEO:") + 1)
    first = time.perf_counter() - start
    process.communicate()
    if process.returncode:
        raise GptzooError(f"gptzoo sample exited with {process.returncode}")
    return first, time.perf_counter() - start


def end_to_end(quick: bool) -> None:
    n = 50 if quick else 500
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, cache_dir = Path(tmp) / "run", Path(tmp) / "jax-cache"
        train_run(run_dir, quick)
        first_ttft, first_total = sample_process(run_dir, cache_dir, n)
        second_ttft, second_total = sample_process(run_dir, cache_dir, n)
    shape = (["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32"]
             if quick else [])
    print(f"{n} tokens from 'ROMEO:', process start to exit: gptzoo sample {first_total:.2f} s "
          f"(first invocation), {second_total:.2f} s (second)")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "nanogpt.py"), "--tokens",
                             str(n), *shape], capture_output=True, text=True)
    nanogpt = time.perf_counter() - start
    if result.returncode:  # torch is a test extra: pip install -e .[test]
        print(f"nanoGPT skipped: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    else:
        print(f"nanoGPT generate, the same shape and length: {nanogpt:.2f} s: gptzoo sample's "
              f"second invocation {nanogpt / second_total:.1f}x faster (target >= 10x)")
    print(f"time to first token: {first_ttft:.2f} s first invocation, {second_ttft:.2f} s second "
          "(compilation cache; target < 1.5 s)\n")


def perceiver(quick: bool) -> None:
    """Perceiver AR (no cache: every token recomputes the window) at the recipe's shape."""
    overrides = ({"model.n_layers": "1", "model.d_model": "32", "model.n_heads": "2",
                  "model.block_size": "64", "model.n_latents": "16"} if quick else {})
    model = load_recipe(ROOT / "recipes" / "perceiver_ar_shakespeare.py", overrides).build(
        65, key=jax.random.PRNGKey(0))
    print(f"Perceiver AR recipe shape, batch 1: {tokens_per_s(model, 1, 16 if quick else 64):.1f}"
          " tok/s (recomputed every token)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models (a smoke test)")
    args = parser.parse_args()
    devices = jax.devices()
    print(f"jax {jax.__version__}, {len(devices)} x {devices[0].platform}, {os.cpu_count()} CPU "
          f"cores, load average {os.getloadavg()[0]:.2f} at the start")
    bw = bandwidth()
    print(f"memory bandwidth (256 MB copy): {bw / 1e9:.1f} GB/s. Random weights, float32, a "
          "1-token prompt, temperature 1, compilation excluded; the bound is bandwidth / bytes "
          "read per step (the weights + each row's filled cache, on average), times the batch.\n")
    models = shapes(args.quick)
    speed = decoding(models, bw, args.quick)
    print("Targets: batch 1 >= 50% of the bound for both models.\n")
    ratios(models, speed, args.quick)
    weight_products(args.quick)
    perceiver(args.quick)
    end_to_end(args.quick)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    try:
        main()
    except GptzooError as e:
        sys.exit(f"error: {e}")
