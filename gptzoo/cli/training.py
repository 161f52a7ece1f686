"""`gptzoo train`, `prepare`, `tune-batch`, `keys`, `plot` and `runs`: recipes and runs."""

import sys

import click

from gptzoo.cli.app import friendly_errors, main


@main.command()
@click.argument("recipe_path", metavar="RECIPE")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set trainer.max_steps=100 (repeatable).")
@click.option("--run-dir", type=click.Path(), help="Where to write the run [runs/<recipe name>].")
@click.option("--resume", is_flag=True, help="Continue from the run directory's latest checkpoint.")
@click.option("--init-from", type=click.Path(), metavar="RUN_DIR",
              help="Start from this run's (or imported model's) weights and tokenizer, with a "
              "fresh optimizer: fine-tuning.")
@click.option("--coordinator", metavar="HOST:PORT",
              help="Multi-host: process 0's address and a free port, with --num-processes and "
              "--process-id (SLURM, Open MPI, Kubernetes and TPU pods need none of the three).")
@click.option("--num-processes", type=int, help="Multi-host: how many processes train together.")
@click.option("--process-id", type=int, help="Multi-host: this process's number, 0 to N-1.")
@friendly_errors
def train(recipe_path, overrides, run_dir, resume, init_from, coordinator, num_processes,
          process_id):
    """Train the model a RECIPE file describes (a recipe .py, or a run's recipe.json)."""
    from gptzoo.compile_cache import enable_compilation_cache
    from gptzoo.recipe import load_recipe, parse_overrides
    from gptzoo.trainer import train as run_training
    from gptzoo.trainer.distributed import join_cluster

    join_cluster(coordinator, num_processes, process_id)
    enable_compilation_cache()
    recipe = load_recipe(recipe_path, parse_overrides(list(overrides)))
    try:
        result = run_training(recipe, run_dir=run_dir, resume=resume, init_from=init_from)
    except KeyboardInterrupt:  # before training began, or a second Ctrl-C: nothing more saved
        click.echo("error: stopped by Ctrl-C, nothing more saved; the checkpoints already saved "
                   "are whole (--resume continues from the newest, if any)", err=True)
        sys.exit(130)
    if result.interrupted:
        sys.exit(130)


@main.command()
@click.argument("recipe_path", metavar="RECIPE")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set data.path=corpus/ (repeatable).")
@friendly_errors
def prepare(recipe_path, overrides):
    """Tokenise a RECIPE's corpus into cached token shards (train does it on first use)."""
    from gptzoo.data import prepare_corpus
    from gptzoo.recipe import load_recipe, parse_overrides

    recipe = load_recipe(recipe_path, parse_overrides(list(overrides)))
    corpus = prepare_corpus(recipe.data, log=click.echo)
    for name, split in (("train", corpus.train), ("val", corpus.val)):
        click.echo(f"{name}: {len(split):,} tokens, {split.n_bytes:,} bytes "
                   f"({split.bytes_per_token:.3f} bytes/token)")
    click.echo(f"tokenizer: {recipe.data.tokenizer}, {corpus.tokenizer.vocab_size:,} tokens; "
               f"cache {corpus.folder}")


@main.command(name="tune-batch")
@click.argument("recipe_path", metavar="RECIPE")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set model.block_size=512 (repeatable).")
@click.option("--memory-gb", type=float, default=None,
              help="The memory budget [the device's own; required on CPU, which reports none].")
@click.option("--peak-flops", type=float, default=None,
              help="The device's peak FLOP/s for MFU [from a table of known GPUs and TPUs].")
@friendly_errors
def tune_batch(recipe_path, overrides, memory_gb, peak_flops):
    """Find the largest micro-batch of a RECIPE that fits, and its tokens/s."""
    from gptzoo.compile_cache import enable_compilation_cache
    from gptzoo.recipe import load_recipe, parse_overrides
    from gptzoo.trainer.tune import report
    from gptzoo.trainer.tune import tune_batch as find

    enable_compilation_cache()  # each micro-batch it tries is a program of its own
    recipe = load_recipe(recipe_path, parse_overrides(list(overrides)))
    if memory_gb is not None and memory_gb <= 0:
        raise click.BadParameter(f"{memory_gb} is not a positive size", param_hint="--memory-gb")
    budget = None if memory_gb is None else int(memory_gb * 2**30)
    for line in report(find(recipe, budget, log=click.echo), peak_flops):
        click.echo(line)


@main.command()
@click.argument("recipe_path", metavar="RECIPE")
@friendly_errors
def keys(recipe_path):
    """List the keys a RECIPE accepts with --set, and their values."""
    from gptzoo.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    for key in recipe.keys():
        click.echo(f"{key}={recipe.get(key)!r}")


@main.command()
@click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, required=True, type=click.Path())
@click.option("--out", default="curves.png", show_default=True, type=click.Path(),
              help="The image to write (PNG, SVG or PDF, by its extension).")
@friendly_errors
def plot(run_dirs, out):
    """Plot the training curves of one or more runs on one figure."""
    from gptzoo.plot import save_plot

    save_plot(list(run_dirs), out)
    click.echo(f"wrote {out}")


@main.command()
@click.argument("root", metavar="[DIR]", default="runs", type=click.Path())
@friendly_errors
def runs(root):
    """A table of the runs under DIR: progress, losses, speed and status."""
    from pathlib import Path

    from rich.console import Console

    from gptzoo.runs import runs_table

    console = Console()
    if not console.is_terminal:  # piped or in CI: rows on one line each, not wrapped at 80
        console.width = 200
    console.print(runs_table(Path(root)))
