"""Fine-tuning an imported GPT-2-small-shaped model on CPU, every weight against LoRA (rank 8 on
the attention and MLP projections): peak RSS and ms per training step.

    python bench/bench_lora.py [--quick] [--steps N] [--batch B] [--remat full none]
                               [--head-chunk C] [--dir DIR]

A random GPT-2 small (transformers' `GPT2Config()`: 12 layers, 768 wide, 12 heads, 1,024
positions, 50,257 tokens; 124M parameters) is made locally with CPU torch, saved with gptzoo's
bytes tokenizer as its tokenizer.json, and imported with `gptzoo import-hf`. Each way then trains
in a process of its own, set up as `gptzoo train RUN/recipe.json --init-from RUN` sets it up
(`gptzoo.trainer.prepared.prepare`; `--set lora.rank=8` for LoRA), one step per call of the very
train chunk the training loop calls, `B` sequences of 1,024 tokens per step: the first (compiling)
step untimed, then `N`. The peak resident memory of each process comes from the kernel
(`os.wait4`), so the two ways do not mix. Both ways are measured with each `trainer.remat` of
`--remat`: with `full` each block keeps only its input for the backward pass; with `none` the
activations of a 1,024-token sequence through 12 layers, kept for the backward pass, outweigh
the optimizer state that LoRA saves. `--quick` shrinks the model (2 layers, 128 wide) and the
steps: a smoke test. `--head-chunk C` sets `trainer.head_chunk` both ways (the head and loss
`C` positions at a time, so the 1,024 x 50,257 logits and their gradient are never whole).
Timings move with whatever else runs on the machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"peak RSS": 0.5, "ms per step": 0.8}  # LoRA's at most this fraction of the full's
QUICK = {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 256}


def make_base(folder: Path, quick: bool) -> Path:
    """The random GPT-2 in `folder/hf`, imported into `folder/run` (kept from an earlier run
    with the same `--dir`)."""
    if (folder / "run" / "recipe.json").is_file():
        return folder / "run"
    import torch
    import transformers

    from gptzoo.data import ByteTokenizer

    config = transformers.GPT2Config(bos_token_id=None, eos_token_id=None,
                                     **(QUICK if quick else {}))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder / "hf")
    ByteTokenizer().to_hf().save(str(folder / "hf" / "tokenizer.json"))
    subprocess.run([sys.executable, "-m", "gptzoo", "import-hf", folder / "hf", "--out",
                    folder / "run"], check=True, cwd=ROOT, capture_output=True)
    return folder / "run"


def train_steps(base: Path, rank: int, steps: int, batch: int, remat: str,
                head_chunk: int) -> dict:
    """In the child process: set the fine-tuning up and time `steps` steps after the first."""
    import jax
    import numpy as np

    from gptzoo.lora.adapters import adapter_of
    from gptzoo.recipe import load_recipe
    from gptzoo.trainer.prepared import prepare
    from gptzoo.trainer.sharding import chunk_sharded

    recipe = load_recipe(base / "recipe.json", {
        "lora.rank": rank, "trainer.batch_size": batch, "trainer.max_steps": steps + 1,
        "trainer.steps_per_call": 1, "optimizer.warmup_steps": 1, "trainer.remat": remat,
        "trainer.head_chunk": head_chunk})
    p = prepare(recipe, log=lambda *_: None, init_from=base)
    model, opt_state, times = p.model, p.opt_state, []
    for step in range(steps + 1):
        clock = time.perf_counter()
        batches = jax.device_put(p.train_batches.chunk(step, 1), chunk_sharded(p.mesh))
        model, opt_state, stats = p.train_chunk((batches, p.train_key, np.int32(step)), model,
                                                opt_state)
        jax.block_until_ready(stats)
        times.append(time.perf_counter() - clock)
    trained = model if not rank else adapter_of(model)
    count = sum(a.size for a in jax.tree.leaves(trained) if hasattr(a, "size"))
    return {"ms": [1e3 * t for t in times[1:]], "trained": int(count),
            "loss": float(stats.loss[-1])}


def measure(base: Path, rank: int, steps: int, batch: int, remat: str, head_chunk: int) -> dict:
    """`train_steps` in a fresh process, with its peak RSS in MB."""
    command = [sys.executable, __file__, "--child", str(base), "--rank", str(rank), "--steps",
               str(steps), "--batch", str(batch), "--remat", remat, "--head-chunk",
               str(head_chunk)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=ROOT, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if status:
        sys.exit(f"error: the rank-{rank} child failed (status {status})")
    return {**json.loads(output.strip().splitlines()[-1]), "rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model, few steps")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per way")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--rank", type=int, default=8, help="LoRA's rank")
    parser.add_argument("--remat", nargs="+", default=["full", "none"],
                        help="the trainer.remat settings to measure both ways with")
    parser.add_argument("--head-chunk", type=int, default=0, help="trainer.head_chunk, both ways")
    parser.add_argument("--dir", type=Path, help="where the model and runs go [a temp dir]")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(train_steps(args.child, args.rank, args.steps, args.batch,
                                     args.remat[0], args.head_chunk)))
        return
    steps = 2 if args.quick else args.steps
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as scratch:
        folder = args.dir or Path(scratch)
        base = make_base(folder, args.quick)
        print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f}; GPT-2"
              f"{' (quick)' if args.quick else ''}, {args.batch} x "
              f"{json.loads((base / 'recipe.json').read_text())['model']['block_size']} tokens "
              f"per step, {steps} timed steps, trainer.head_chunk={args.head_chunk}")
        for remat in args.remat:
            report(remat, {"full": measure(base, 0, steps, args.batch, remat, args.head_chunk),
                           f"LoRA r={args.rank}": measure(base, args.rank, steps, args.batch,
                                                          remat, args.head_chunk)})


def report(remat: str, results: dict) -> None:
    print(f"trainer.remat={remat}")
    for name, r in results.items():
        print(f"  {name:10s} {r['trained']:>12,} trained  peak RSS {r['rss_mb']:8,.0f} MB  "
              f"{statistics.median(r['ms']):9,.0f} ms/step (median; "
              f"{', '.join(f'{t:,.0f}' for t in r['ms'])})  loss {r['loss']:.3f}")
    full, lora = results.values()
    ratios = {"peak RSS": lora["rss_mb"] / full["rss_mb"],
              "ms per step": statistics.median(lora["ms"]) / statistics.median(full["ms"])}
    print("  LoRA / full: " + ", ".join(f"{k} {v:.2f} (goal <= {GOALS[k]})"
                                        for k, v in ratios.items()))


if __name__ == "__main__":
    main()
