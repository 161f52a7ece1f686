"""Train every recipe in recipes/ (but the *_gpu.py ones) on tiny Shakespeare for the same
wall-clock budget, and write a Markdown table of the results.

    python docs/compare_recipes.py           # 120 s per recipe, written to docs/recipes_table.md
    python docs/compare_recipes.py --seconds 10 --out /tmp/smoke.md

A recipe first trains a short timing run to measure its milliseconds per step, then trains from
scratch for `budget / ms_per_step` steps, so that its cosine schedule ends within the budget, and
is evaluated on the whole validation split. Run it on an otherwise idle machine.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax

from gptzoo import load_recipe, train
from gptzoo.recipe import DataConfig

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "recipes_table.md"
SMOKE_SECONDS = 60  # budgets below this only check that the script works


def recipe_paths() -> list[Path]:
    return sorted(p for p in (ROOT / "recipes").glob("*.py") if not p.name.endswith("_gpu.py"))


def run(path: Path, max_steps: int, run_dir: Path) -> dict:
    """Train `path` for `max_steps` on tiny Shakespeare, evaluating and saving only at the end."""
    recipe = load_recipe(path, {
        "trainer.max_steps": max_steps, "trainer.eval_interval": max_steps,
        "trainer.checkpoint_interval": max_steps,
        # The same data and validation split for every recipe, whatever its own data section.
        "data.path": DataConfig().path, "data.val_fraction": DataConfig().val_fraction,
    })
    clock = time.perf_counter()
    result = train(recipe, run_dir=run_dir)
    seconds = time.perf_counter() - clock
    tokens_per_step = recipe.trainer.batch_size * recipe.model.block_size
    # Chunks that compiled log no speed; the rest give the steady-state time of a step.
    speeds = [r["tokens_per_sec"] for r in _records(run_dir) if r.get("tokens_per_sec")]
    return {
        "params": sum(a.size for a in jax.tree.leaves(eqx.filter(result.model, eqx.is_array))),
        "ms_per_step": 1e3 * tokens_per_step / statistics.median(speeds) if speeds else None,
        "steps": result.step, "seconds": seconds, "val_loss": result.val_loss,
    }


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open() if line.strip()]


def compare(seconds: float, timing_steps: int, workdir: Path) -> dict[str, dict]:
    rows = {}
    for path in recipe_paths():
        timing = run(path, timing_steps, workdir / f"{path.stem}-timing")
        if timing["ms_per_step"] is None:
            sys.exit(f"{path.name}: {timing_steps} timing steps logged no steady-state speed; "
                     "pass a larger --timing-steps")
        steps = max(1, int(seconds * 1e3 / timing["ms_per_step"]))
        rows[path.stem] = run(path, steps, workdir / path.stem)
        row = rows[path.stem]
        print(f"{path.stem}: {timing['ms_per_step']:.1f} ms/step timed -> {steps} steps in "
              f"{row['seconds']:.0f} s, val loss {row['val_loss']:.4f}", flush=True)
    return rows


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(rows: dict[str, dict], seconds: float, command: str) -> str:
    devices = jax.devices()
    smoke = (f" **A smoke run: {seconds:g} s is too short a budget to compare the recipes.**"
             if seconds < SMOKE_SECONDS else "")
    header = (
        f"Generated {datetime.date.today().isoformat()} on {os.cpu_count()} cores of "
        f"{cpu_model()} ({len(devices)} {devices[0].platform} device(s)), jax {jax.__version__}: "
        f"each recipe trained on tiny Shakespeare for a budget of {seconds:g} s of steps "
        "(its step count is the budget over the ms per step of a short timing run; wall seconds "
        "add compilation and the final evaluation), then evaluated on the whole validation split "
        f"(nats per character, lower is better). Regenerate with `{command}`.{smoke}"
    )
    lines = ["| recipe | parameters | ms per step | steps | wall seconds | val loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in sorted(rows.items(), key=lambda item: item[1]["val_loss"]):
        ms = "n/a" if r["ms_per_step"] is None else f"{r['ms_per_step']:.1f}"
        lines.append(f"| `{name}` | {r['params']:,} | {ms} | {r['steps']:,} | "
                     f"{r['seconds']:.0f} | {r['val_loss']:.4f} |")
    return header + "\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120,
                        help="training budget per recipe, in seconds of steps [120]")
    parser.add_argument("--timing-steps", type=int, default=50,
                        help="steps of the timing run that measures ms per step [50]")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="where to write the table [docs/recipes_table.md]")
    args = parser.parse_args()
    command = ["python", "docs/compare_recipes.py", "--seconds", f"{args.seconds:g}"]
    if args.timing_steps != 50:
        command += ["--timing-steps", str(args.timing_steps)]
    if args.out.resolve() != DEFAULT_OUT:
        command += ["--out", str(args.out)]
    with tempfile.TemporaryDirectory() as workdir:
        rows = compare(args.seconds, args.timing_steps, Path(workdir))
    args.out.write_text(table(rows, args.seconds, shlex.join(command)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
