"""Train every tiny-Shakespeare recipe in recipes/ to the end of its own schedule, one at a time,
and write a Markdown table of the results.

    python docs/compare_recipes.py        # each recipe's own max_steps, to docs/recipes_table.md
    python docs/compare_recipes.py --seconds 120 --out /tmp/budget.md   # the same wall-clock budget
    python docs/compare_recipes.py --seconds 10 --out /tmp/smoke.md     # checks the script works
    python docs/compare_recipes.py --only mixtral_shakespeare   # (re)train some, keep other rows

Every recipe reads the same text with the same validation split and is evaluated once, at the end,
on the whole validation split, in nats per token and in bits per UTF-8 byte (the figure that
compares a character model with a BPE one). With `--seconds`, a recipe first trains a short timing
run to measure its milliseconds per step, then trains from scratch for `budget / ms_per_step`
steps, so that its cosine schedule ends within the budget. Run it on an otherwise idle machine.
"""

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax

from gptzoo import load_recipe, train
from gptzoo.recipe import DataConfig
from gptzoo.trainer.flops import count_parameters
from gptzoo.trainer.metrics_file import read_records

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "recipes_table.md"
SMOKE_SECONDS = 60  # budgets below this only check that the script works
# Not tiny-Shakespeare recipes: the GPU shape, and GPT-2 small (OpenWebText, ~0.5M tokens a step).
SKIPPED = ("char_shakespeare_gpu.py", "gpt2_124m.py")


def recipe_paths(only: list[str] | None = None) -> list[Path]:
    paths = sorted(p for p in (ROOT / "recipes").glob("*.py") if p.name not in SKIPPED)
    unknown = sorted(set(only or ()) - {p.stem for p in paths})
    if unknown:
        sys.exit(f"--only {' '.join(unknown)}: no such recipe; choose from "
                 f"{', '.join(p.stem for p in paths)}")
    return [p for p in paths if only is None or p.stem in only]


def run(path: Path, max_steps: int | None, run_dir: Path) -> dict:
    """Train `path` on tiny Shakespeare for `max_steps` (None: the recipe's own), evaluating and
    saving only at the end."""
    steps = max_steps or load_recipe(path).trainer.max_steps
    recipe = load_recipe(path, {
        "trainer.max_steps": steps, "trainer.eval_interval": steps,
        "trainer.checkpoint_interval": steps,
        # The same data and validation split for every recipe, whatever its own data section.
        "data.path": DataConfig().path, "data.val_fraction": DataConfig().val_fraction,
    })
    clock = time.perf_counter()
    result = train(recipe, run_dir=run_dir)
    seconds = time.perf_counter() - clock
    # Chunks that compiled log no speed; the rest give the steady-state speed.
    speeds = [r["tokens_per_sec"] for r in read_records(run_dir) if r.get("tokens_per_sec")]
    tokens_per_sec = statistics.median(speeds) if speeds else None
    tokens_per_step = recipe.trainer.batch_size * recipe.model.block_size
    return {
        "params": count_parameters(result.model),
        "tokens_per_sec": tokens_per_sec,
        "ms_per_step": 1e3 * tokens_per_step / tokens_per_sec if speeds else None,
        "steps": result.step, "seconds": seconds, "val_loss": result.val_loss,
        "val_bpb": result.val_bpb, "tokenizer": recipe.data.tokenizer,
    }


def compare(seconds: float | None, timing_steps: int, workdir: Path,
            only: list[str] | None = None) -> dict[str, dict]:
    rows = {}
    for path in recipe_paths(only):
        steps = None
        if seconds is not None:
            timing = run(path, timing_steps, workdir / f"{path.stem}-timing")
            if timing["ms_per_step"] is None:
                sys.exit(f"{path.name}: {timing_steps} timing steps logged no steady-state speed; "
                         "pass a larger --timing-steps")
            steps = max(1, int(seconds * 1e3 / timing["ms_per_step"]))
        rows[path.stem] = row = run(path, steps, workdir / path.stem)
        print(f"{path.stem}: {row['steps']} steps in {row['seconds']:.0f} s, "
              f"val loss {row['val_loss']:.4f}, {row['val_bpb']:.4f} bits/byte", flush=True)
    return rows


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table_rows(rows: dict[str, dict]) -> list[str]:
    lines = []
    for name, r in rows.items():
        speed = "n/a" if r["tokens_per_sec"] is None else f"{r['tokens_per_sec']:,.0f}"
        lines.append(f"| `{name}` | {r['tokenizer']} | {r['params']:,} | {r['steps']:,} | "
                     f"{r['seconds']:.0f} | {speed} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} |")
    return lines


def with_rows(text: str, rows: dict[str, dict], command: str) -> str:
    """The table `text` with `rows` replacing or joining its own, sorted by bits per byte, and a
    line saying which rows came from `command`, on which machine."""
    header, _, body = text.partition("\n\n")
    kept = [line for line in body.splitlines() if line.startswith("| `")
            and line.split("`")[1] not in rows]
    lines = sorted(kept + table_rows(rows), key=lambda line: float(line.rstrip(" |").split()[-1]))
    note = (f"Rows of {', '.join(f'`{n}`' for n in rows)}: {datetime.date.today().isoformat()}, "
            f"{os.cpu_count()} cores of {cpu_model()}, jax {jax.__version__}, `{command}`.")
    notes = [line for line in body.splitlines() if line.startswith("Rows of ")]
    return (header + "\n\n" + "\n".join(body.splitlines()[:2] + lines) + "\n\n"
            + "\n".join(notes + [note]) + "\n")


def table(rows: dict[str, dict], seconds: float | None, command: str) -> str:
    devices = jax.devices()
    if seconds is None:
        length = "to the end of its own schedule (its `trainer.max_steps`)"
    else:
        length = (f"for a budget of {seconds:g} s of steps (its step count is the budget over the "
                  "ms per step of a short timing run)")
    smoke = (f" **A smoke run: {seconds:g} s is too short a budget to compare the recipes.**"
             if seconds is not None and seconds < SMOKE_SECONDS else "")
    header = (
        f"Generated {datetime.date.today().isoformat()} on {os.cpu_count()} cores of "
        f"{cpu_model()} ({len(devices)} {devices[0].platform} device(s)), jax {jax.__version__}: "
        f"each recipe trained on tiny Shakespeare {length}, one at a time, then evaluated on the "
        "whole validation split. Loss is in nats per token of the recipe's own tokenizer; bits "
        "per byte of UTF-8 text compare tokenizers (lower is better; for a character model of "
        "ASCII text it is the loss in bits). Wall seconds include compilation and the final "
        f"evaluation; tokens/s is the median training speed. Regenerate with `{command}`.{smoke}"
    )
    lines = ["| recipe | tokenizer | parameters | steps | wall seconds | tokens/s | val loss "
             "| val bits/byte |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += table_rows(dict(sorted(rows.items(), key=lambda item: item[1]["val_bpb"])))
    return header + "\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=None,
                        help="train each recipe for this budget of seconds of steps instead of "
                             "its own max_steps")
    parser.add_argument("--timing-steps", type=int, default=50,
                        help="with --seconds: steps of the timing run that measures ms per step "
                             "[50]")
    parser.add_argument("--only", nargs="+", metavar="RECIPE",
                        help="train only these recipes (file stems) and replace or add their rows "
                             "in the existing table")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="where to write the table [docs/recipes_table.md]")
    args = parser.parse_args()
    # JAX starts here, so every recipe trains on the devices found (one CPU device on a CPU): a
    # recipe's `mesh.cpu_devices` would split the CPU only for the first recipe this process ran.
    jax.devices()
    command = ["python", "docs/compare_recipes.py"]
    if args.seconds is not None:
        command += ["--seconds", f"{args.seconds:g}"]
        if args.timing_steps != 50:
            command += ["--timing-steps", str(args.timing_steps)]
    if args.out.resolve() != DEFAULT_OUT:
        command += ["--out", str(args.out)]
    if args.only:
        command += ["--only", *args.only]
    with tempfile.TemporaryDirectory() as workdir:
        rows = compare(args.seconds, args.timing_steps, Path(workdir), args.only)
    if args.only:
        args.out.write_text(with_rows(args.out.read_text(), rows, shlex.join(command)))
    else:
        args.out.write_text(table(rows, args.seconds, shlex.join(command)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
