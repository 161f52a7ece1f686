"""Tokens/s and model FLOPs utilisation (MFU) of the default recipe and of GPT-2 small.

    python bench/bench_mfu.py [--quick] [--peak-flops F] [--gpt2-micro-batch N [--grad-accum K]]
                              [--set KEY=VALUE ...] [--variant KEY=VALUE[,KEY=VALUE...] ...]

MFU counts the model's training FLOPs (6N + 12 L d T per token, `gptzoo.trainer.flops`) over the
device's peak: its datasheet bf16 peak for known GPUs and TPUs, `--peak-flops` if given, else
(CPUs) the best float32 matmul this process measures, which is labelled as such. GPT-2 small
runs at `--gpt2-micro-batch` when given, else at the micro-batch `gptzoo tune-batch` finds where
the device reports its memory (GPUs), else at 1. Each row times one optimizer step per
micro-batch, steps dispatched back to back as the trainer dispatches them; with `--grad-accum K`
each GPT-2 optimizer step accumulates K micro-batches, as its recipe does (its 512 sequences are
8 micro-batches of 64; tiny Shakespeare, the corpus when no `data.path` is set, holds 4).

`--set` overrides GPT-2's recipe; each `--variant` adds a GPT-2 row with its own overrides on top,
so one process compares settings side by side on one device (a lent GPU's minutes go further);
a variant that runs out of the device's memory prints so and the rest go on:

    python bench/bench_mfu.py --gpt2-micro-batch 64 --variant trainer.remat=none \\
        --variant trainer.unroll_layers=false
"""

import argparse
import os
import sys
from pathlib import Path

import jax

from gptzoo.errors import GptzooError
from gptzoo.recipe import load_recipe, parse_overrides
from gptzoo.trainer import flops
from gptzoo.trainer.tune import device_memory_bytes, throughput, tune_batch

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def peak(args) -> tuple[float, str]:
    if args.peak_flops:
        return args.peak_flops, "--peak-flops"
    known = flops.known_peak_flops(jax.devices()[0])
    if known:
        return known, "datasheet bf16"
    return flops.measured_matmul_flops(), "measured f32 matmul"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--peak-flops", type=float, help="the device's peak FLOP/s")
    parser.add_argument("--gpt2-micro-batch", type=int,
                        help="GPT-2 small's micro-batch (default: tune-batch's on GPUs, else 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override GPT-2's recipe (repeatable)")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,...]",
                        help="a further GPT-2 row with these overrides (repeatable)")
    parser.add_argument("--grad-accum", type=int, default=1, metavar="K",
                        help="micro-batches per GPT-2 optimizer step (default 1)")
    args = parser.parse_args()
    if args.grad_accum < 1 or (args.grad_accum > 1 and not args.gpt2_micro_batch):
        parser.error("--grad-accum takes a positive K, with --gpt2-micro-batch")
    steps = 2 if args.quick else 5
    device = jax.devices()[0]
    n_devices = len(jax.devices())
    peak_flops, source = peak(args)
    print(f"jax {jax.__version__}, {n_devices} x {device.device_kind}, {os.cpu_count()} CPU "
          f"cores, load average {os.getloadavg()[0]:.2f}; peak {peak_flops / 1e12:.3f} TFLOP/s "
          f"per device ({source})\n")
    default = load_recipe(RECIPES / "char_shakespeare.py")
    base = parse_overrides(args.set)
    variants = {"": {}} | {v: parse_overrides(v.split(",")) for v in args.variant}
    width = max(len("char_shakespeare"), *(len(f"gpt2_124m {v}") for v in variants))
    print(f"{'recipe':{width}} {'micro-batch':>11} {'tokens/s':>10} {'GFLOP/token':>11} "
          f"{'MFU':>7}")
    row("char_shakespeare", width, default.trainer.batch_size,
        *throughput(default, default.trainer.batch_size, steps), peak_flops, n_devices)
    for name, overrides in variants.items():
        gpt2 = load_recipe(RECIPES / "gpt2_124m.py", base | overrides)
        label = f"gpt2_124m {name}".strip()
        if args.gpt2_micro_batch is None and device_memory_bytes() is not None:
            # tune-batch's own timing of the micro-batch it finds
            tuned = tune_batch(gpt2, timed_steps=steps, log=lambda line: print(f"  {line}"))
            row(label, width, tuned.micro_batch, tuned.tokens_per_sec, tuned.flops_per_token,
                peak_flops, n_devices)
        else:
            micro = args.gpt2_micro_batch or 1
            try:
                measured = throughput(gpt2, micro, steps, args.grad_accum)
            except jax.errors.JaxRuntimeError as e:  # one variant's memory need not end the rest
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                print(f"{label:{width}} {micro:>11} does not fit the device's memory", flush=True)
                continue
            row(label, width, micro, *measured, peak_flops, n_devices)


def row(name: str, width: int, micro: int, tokens_per_sec: float, per_token: float,
        peak_flops: float, n_devices: int) -> None:
    utilisation = flops.mfu(tokens_per_sec, per_token, peak_flops, n_devices)
    print(f"{name:{width}} {micro:>11} {tokens_per_sec:>10,.0f} {per_token / 1e9:>11.3f} "
          f"{utilisation:>7.1%}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except GptzooError as e:  # a bad --set or a corpus too small for the batch: one line
        sys.exit(f"error: {e}")
