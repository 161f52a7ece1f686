"""What `gptzoo.stored_jit` saves over JAX's persistent compilation cache alone, for a second
`gptzoo sample` of the same run (the first fills the caches).

    python bench/bench_stored_jit.py [--rounds 5] [--ckpt RUN_DIR] [--set KEY=VALUE ...]

Both ways keep JAX's persistent compilation cache on, each in a folder of its own, filled by one
`gptzoo sample` before the timed ones. "stored" is `gptzoo sample` as shipped: its programs read
back whole from `programs/`, without tracing. "jax cache only" is the same command with
`store_programs_in` made a no-op, so every sampler program is traced and lowered again and its
compiled form read from JAX's cache. Rounds alternate the two (stored, jax cache only, stored,
...), so load that comes and goes hits both alike; each prints its wall time from process start
to exit, and the medians and their difference come last. The issue's bar: keep `stored_jit` only
for a gain of at least 0.5 s.

Without `--ckpt` it first trains the default recipe (`recipes/char_shakespeare.py`) for one step
into a temporary folder, so the sampled model has the recipe's size; `--set` overrides the recipe
for that run.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "char_shakespeare.py"
SAMPLE = ["--prompt", "ROMEO:", "--max-new-tokens", "200", "--seed", "1"]
# `gptzoo sample` with stored_jit's folder never set: its programs compile in memory, through
# JAX's persistent cache, as `eqx.filter_jit`'s would.
_JAX_CACHE_ONLY = """
import sys
import gptzoo.compile_cache
gptzoo.compile_cache.store_programs_in = lambda directory: None
from gptzoo.cli import entry
sys.argv = ["gptzoo", *sys.argv[1:]]
entry()
"""
MODES = {"stored": [sys.executable, "-m", "gptzoo"],
         "jax cache only": [sys.executable, "-c", _JAX_CACHE_ONLY]}


def sample(mode: str, run_dir: Path, cache: Path) -> tuple[float, str]:
    """Seconds of one `gptzoo sample`, process start to exit, and what it printed."""
    env = {**os.environ, "GPTZOO_COMPILE_CACHE": str(cache)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # each mode's own, under its GPTZOO_COMPILE_CACHE
    start = time.perf_counter()
    done = subprocess.run([*MODES[mode], "sample", "--ckpt", str(run_dir), *SAMPLE], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{mode}: gptzoo sample failed:\n{done.stderr}")
    return seconds, done.stdout


def train_one_step(run_dir: Path, overrides: list[str]) -> None:
    sets = [a for o in ["trainer.max_steps=1", "trainer.eval_interval=1", *overrides]
            for a in ("--set", o)]
    subprocess.run([sys.executable, "-m", "gptzoo", "train", str(RECIPE), *sets, "--run-dir",
                    str(run_dir)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ckpt", type=Path, help="a run directory to sample (default: trains "
                        "the default recipe for one step)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_dir = args.ckpt or tmp / "run"
        if args.ckpt is None:
            train_one_step(run_dir, args.overrides)
        caches = {mode: tmp / mode.replace(" ", "_") for mode in MODES}
        texts = {mode: sample(mode, run_dir, caches[mode])[1] for mode in MODES}  # fill caches
        if len(set(texts.values())) != 1:
            sys.exit("the two ways printed different samples")
        seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
        for i in range(args.rounds):
            for mode in MODES:
                seconds[mode].append(sample(mode, run_dir, caches[mode])[0])
            print(f"round {i + 1}: " + ", ".join(f"{m} {s[-1]:.2f} s" for m, s in seconds.items()),
                  flush=True)
    medians = {mode: statistics.median(s) for mode, s in seconds.items()}
    gain = medians["jax cache only"] - medians["stored"]
    print(", ".join(f"{m}: median {t:.2f} s" for m, t in medians.items())
          + f"; stored_jit saves {gain:.2f} s (the bar: 0.5 s)")


if __name__ == "__main__":
    main()
