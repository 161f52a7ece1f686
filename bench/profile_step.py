"""Where a training step's time goes on an accelerator: device kernel time by kind and by name.

    python bench/profile_step.py RECIPE --micro-batch N [--set KEY=VALUE ...] [--steps 3]
                                 [--top 25] [--csv kernels.csv]

Traces `--steps` optimizer steps of one micro-batch of random tokens with `jax.profiler`, reads
the device's kernels back from the trace, and prints their time per step by kind (matrix
products, attention, reductions, other fusions, copies) and the longest kernels by name. Busy is
the kernels' time over the traced steps' wall-clock time: below 100%, the device waited (for the
host, or between kernels). On a CPU there are no device kernels to read: use an accelerator.
"""

import argparse
import csv
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import jax
from jax.profiler import ProfileData

from gptzoo.recipe import load_recipe, parse_overrides
from gptzoo.trainer.tune import train_step

# First match wins; names are XLA's fusion names, cuBLAS/CUTLASS/cuDNN kernel names, or TPU ops.
KINDS = (
    ("attention", r"sdpa|fmha|flash|attention|cudnn"),
    ("matrix products", r"gemm|nvjet|xmma|cutlass|cublas|convolution|\bdot|matmul|wgmma"),
    ("copies", r"memcpy|memset|copy|transpose|dynamic[_-]update[_-]slice|concatenate"),
    ("reductions", r"reduce|scatter|sort"),
    ("other fusions", r"fusion|loop|input|triton|convert|multiply|add|broadcast|select"),
)


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, name)), "other")


def device_kernels(data: ProfileData) -> list[tuple[str, int]]:
    """`(name, nanoseconds)` of every kernel on the accelerators' streams. XLA's derived lines
    ("XLA Ops", "XLA Modules", "Steps") repeat the same time by op and are left out."""
    kernels = []
    for plane in data.planes:
        if not plane.name.startswith("/device:") or plane.name.startswith("/device:CUSTOM"):
            continue
        lines = [line for line in plane.lines if not line.name.startswith(("XLA", "Steps",
                                                                          "Framework", "Source"))]
        for line in lines:
            kernels.extend((event.name, event.duration_ns) for event in line.events)
    return kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--micro-batch", type=int, required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=3, help="traced steps")
    parser.add_argument("--top", type=int, default=25, help="kernels listed by name")
    parser.add_argument("--csv", type=Path, help="write every kernel's time here")
    args = parser.parse_args()
    if jax.default_backend() == "cpu":
        sys.exit("profile_step reads accelerator kernels from the trace; this process has only "
                 "CPU devices (run it where jax.devices() lists a GPU or TPU)")
    recipe = load_recipe(args.recipe, parse_overrides(args.set))
    step = train_step(recipe, args.micro_batch)
    jax.block_until_ready(step())  # compiles
    jax.block_until_ready(step())  # the first run of a shape still warms the allocator
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir):
            clock = time.perf_counter()
            for _ in range(args.steps):  # back to back, as the trainer dispatches them
                state = step()
            jax.block_until_ready(state)
            wall = time.perf_counter() - clock
        data = ProfileData.from_file(str(next(Path(log_dir).rglob("*.xplane.pb"))))
    kernels = device_kernels(data)
    if not kernels:
        lines = {plane.name: [line.name for line in plane.lines] for plane in data.planes}
        sys.exit(f"no device kernels in the trace; its planes and lines: {lines}")
    report(kernels, args.steps, wall, args.top, args.csv)


def report(kernels: list[tuple[str, int]], steps: int, wall: float, top: int,
           csv_path: Path | None) -> None:
    by_name: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, ns in kernels:
        by_name[name][0] += ns
        by_name[name][1] += 1
    total = sum(ns for ns, _ in by_name.values())
    print(f"{len(kernels)} kernels, {total / steps / 1e6:.1f} ms per step on the device, "
          f"{wall / steps * 1e3:.1f} ms per step wall-clock (busy {total / 1e9 / wall:.0%})\n")
    by_kind: dict[str, int] = defaultdict(int)
    for name, (ns, _) in by_name.items():
        by_kind[kind_of(name)] += ns
    print(f"{'kind':24} {'ms/step':>8} {'share':>6}")
    for kind, ns in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"{kind:24} {ns / steps / 1e6:>8.2f} {ns / total:>6.1%}")
    print(f"\n{'kernel':70} {'kind':16} {'calls':>6} {'ms/step':>8} {'share':>6}")
    ranked = sorted(by_name.items(), key=lambda item: -item[1][0])
    for name, (ns, calls) in ranked[:top]:
        print(f"{name[:70]:70} {kind_of(name):16} {calls / steps:>6.1f} {ns / steps / 1e6:>8.2f} "
              f"{ns / total:>6.1%}")
    if csv_path:
        with csv_path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["kernel", "kind", "calls_per_step", "ms_per_step"])
            for name, (ns, calls) in ranked:
                writer.writerow([name, kind_of(name), calls / steps, ns / steps / 1e6])


if __name__ == "__main__":
    main()
