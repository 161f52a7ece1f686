"""gptzoo's training speed against nanoGPT's, each side in a process of its own.

nanoGPT's side is its unmodified `model.py` (bench/third_party/nanogpt, MIT licence) driven by
the lines of its `train.py` loop (forward with targets, backward, global-norm clipping at 1.0,
`configure_optimizers`' AdamW, `zero_grad(set_to_none=True)`), eager and under `torch.compile`;
gptzoo's is the train chunk `gptzoo train` runs, on the char_shakespeare recipe at the same shape.
Both use nanoGPT's defaults where a choice matters to speed: no biases, tied embeddings, dropout
0, float32, a vocabulary of 65 characters. Batches are made before the clock starts on both sides.

The rounds run each side once per shape in turn (gptzoo, nanoGPT eager, nanoGPT compiled, ...),
so load from other work falls on all alike; a round's ratio is gptzoo's tokens/s over the faster
nanoGPT variant's in that round, and the figure is the median of the rounds' ratios.

    python bench/bench_vs_nanogpt.py [--rounds 5 | --quick] [--shapes 4x128 6x384]
                                     [--set KEY=VALUE ...]
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPE = HERE.parent / "recipes" / "char_shakespeare.py"
VOCAB = 65  # tiny Shakespeare's characters
# nanoGPT's two CPU settings: train_shakespeare_char.py's "on a macbook" line, and its model at a
# CPU-sized batch.
SHAPES = {
    "4x128": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12},
    "6x384": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "batch_size": 8},
}
STEPS = {"4x128": 200, "6x384": 30}  # timed steps per process (after warm-up)
SIDES = ("gptzoo", "nanoGPT eager", "nanoGPT compile")  # timed; "nanoGPT profile" is not


def nanogpt_iteration(shape: dict, compiled: bool):
    """`iteration() -> seconds`: one train.py iteration of nanoGPT's model at `shape`."""
    import torch

    sys.path.insert(0, str(HERE / "third_party" / "nanogpt"))
    from model import GPT, GPTConfig

    torch.manual_seed(1337)
    config = GPTConfig(block_size=shape["block_size"], vocab_size=VOCAB, n_layer=shape["n_layer"],
                       n_head=shape["n_head"], n_embd=shape["n_embd"], dropout=0.0, bias=False)
    model = GPT(config)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    if compiled:
        model = torch.compile(model)
    X = torch.randint(0, VOCAB, (shape["batch_size"], shape["block_size"]))
    Y = torch.randint(0, VOCAB, (shape["batch_size"], shape["block_size"]))

    def iteration() -> float:
        t0 = time.perf_counter()
        logits, loss = model(X, Y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return iteration


def time_nanogpt(shape: dict, steps: int, compiled: bool) -> list[float]:
    """Seconds of each of `steps` iterations, after warm-up (and compilation)."""
    iteration = nanogpt_iteration(shape, compiled)
    for _ in range(5):
        iteration()
    return [iteration() for _ in range(steps)]


def nanogpt_breakdown(shape: dict, steps: int = 10) -> str:
    """Where nanoGPT's eager iteration spends its time under torch's profiler (which slows the
    small operations a little): matrix products and attention against the whole. Their ratio is
    the most gptzoo could gain on this shape with products and attention no faster than
    torch's."""
    from torch.profiler import ProfilerActivity, profile

    iteration = nanogpt_iteration(shape, compiled=False)
    for _ in range(3):
        iteration()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            iteration()
    ms = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
    products = sum(t for name, t in ms.items() if name in ("aten::mm", "aten::addmm", "aten::bmm"))
    attention = sum(t for name, t in ms.items() if "scaled_dot_product" in name)
    step = sum(ms.values())
    return (f"step {step:,.1f} ms, matrix products {products:,.1f} ({products / step:.0%}), "
            f"attention {attention:,.1f}: with both as fast as torch's and all else free, gptzoo "
            f"would train at most {step / (products + attention):.2f}x nanoGPT eager")


def time_gptzoo(shape: dict, steps: int, overrides: list[str]) -> list[float]:
    """Seconds per step of each timed call of the train chunk (after warm-up)."""
    from bench_train import chunk_timer

    from gptzoo.recipe import load_recipe, parse_overrides
    from gptzoo.trainer.distributed import split_cpu
    from gptzoo.trainer.prepared import prepare

    settings = {"model.n_layers": shape["n_layer"], "model.n_heads": shape["n_head"],
                "model.d_model": shape["n_embd"], "model.block_size": shape["block_size"],
                "trainer.batch_size": shape["batch_size"], "model.use_bias": "false",
                "model.dropout": 0}
    recipe = load_recipe(RECIPE, {**{k: str(v) for k, v in settings.items()},
                                  **parse_overrides(overrides)})
    split_cpu(recipe)  # as `gptzoo train` does: the recipe's CPU devices
    p = prepare(recipe, log=lambda *_: None)
    n = recipe.trainer.steps_per_call
    run_chunk = chunk_timer(p, n)
    for _ in range(2):
        run_chunk()  # compiles, warms up
    return [run_chunk() / n for _ in range(max(1, steps // n))]


def one_side(side: str, shape_name: str, overrides: list[str]) -> dict:
    """Run one side in this process: its tokens/s, or nanoGPT's profile."""
    shape = SHAPES[shape_name]
    steps = STEPS[shape_name]
    if side == "nanoGPT profile":
        return {"breakdown": nanogpt_breakdown(shape)}
    if side == "gptzoo":
        seconds = time_gptzoo(shape, steps, overrides)
    else:
        seconds = time_nanogpt(shape, steps, compiled=side == "nanoGPT compile")
    return {"tokens_per_s": shape["batch_size"] * shape["block_size"] / statistics.median(seconds)}


def run_side(side: str, shape_name: str, overrides: list[str]) -> dict:
    """`one_side` in a process of its own (which writes its answer to a file: torch's profiler
    writes to stdout too)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as answer:
        command = [sys.executable, __file__, "--side", side, "--shapes", shape_name,
                   "--answer", answer.name, *(f"--set={o}" for o in overrides)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"{side} on {shape_name} failed:\n{result.stderr[-3000:]}")
        return json.loads(Path(answer.name).read_text())


def versions() -> str:
    import jax
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return (f"{cpu}; jax {jax.__version__}, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one round (a smoke test)")
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for gptzoo's side (repeatable)")
    parser.add_argument("--side", choices=[*SIDES, "nanoGPT profile"], help=argparse.SUPPRESS)
    parser.add_argument("--answer", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rounds = 1
    if args.side:
        answer = one_side(args.side, args.shapes[0], args.set)
        return args.answer.write_text(json.dumps(answer))
    print(versions())
    print(f"tokens/s, each side a process of its own, {args.rounds} interleaved rounds; "
          f"gptzoo overrides: {args.set or 'none'}")
    for shape_name in args.shapes:
        ratios, speeds = [], {side: [] for side in SIDES}
        for _ in range(args.rounds):
            row = {side: run_side(side, shape_name, args.set)["tokens_per_s"] for side in SIDES}
            for side, speed in row.items():
                speeds[side].append(speed)
            ratios.append(row["gptzoo"] / max(row["nanoGPT eager"], row["nanoGPT compile"]))
            print(f"  {shape_name}: " + ", ".join(f"{s} {v:,.0f}" for s, v in row.items())
                  + f"; ratio {ratios[-1]:.2f}", flush=True)
        print(f"{shape_name}: " + ", ".join(f"{s} {statistics.median(v):,.0f}"
                                            for s, v in speeds.items())
              + f"; gptzoo / nanoGPT's faster: median {statistics.median(ratios):.2f}x "
              f"(rounds {min(ratios):.2f}-{max(ratios):.2f})", flush=True)
        print(f"{shape_name}: nanoGPT eager under torch's profiler: "
              + run_side("nanoGPT profile", shape_name, [])["breakdown"], flush=True)


if __name__ == "__main__":
    main()
