"""The generic training loop: recipe in, trained model and run directory out."""

import math
import signal
from collections.abc import Callable
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptzoo.data import Batches, BatchSchedule, Corpus, Prefetcher, Tokenizer, prepare_corpus
from gptzoo.errors import GptzooError
from gptzoo.models.protocol import AuxLossModel, LanguageModel, require
from gptzoo.nn.stack import with_scan_settings
from gptzoo.recipe import Recipe, save_recipe
from gptzoo.trainer.accumulate import check_micro_batches
from gptzoo.trainer.checkpoint import BEST, BestCheckpoint, Checkpoints, ensure_writable
from gptzoo.trainer.distributed import agreed_stop, is_main, main_first
from gptzoo.trainer.evaluate import evaluate
from gptzoo.trainer.guard import BadSteps
from gptzoo.trainer.init_from import Initial
from gptzoo.trainer.optimizer import make_optimizer, make_schedule
from gptzoo.trainer.progress import MetricsLog, Reporter, Throughput
from gptzoo.trainer.run_status import RunStatus
from gptzoo.trainer.sharding import (
    batch_sharded,
    build_sharded,
    chunk_sharded,
    make_mesh,
    shard,
)
from gptzoo.trainer.sinks import Sinks, open_sinks
from gptzoo.trainer.step import estimate_loss, make_train_chunk


@dataclass
class TrainResult:
    model: LanguageModel
    tokenizer: Tokenizer
    run_dir: Path
    step: int
    val_loss: float | None  # over the whole validation split; None if interrupted
    interrupted: bool
    val_bpb: float | None = None  # the same in bits per UTF-8 byte: comparable across tokenizers


@dataclass
class Prepared:
    """Everything a run needs before its first step, built from the recipe alone."""

    corpus: Corpus
    tokenizer: Tokenizer
    train_batches: Batches
    val_batches: Batches  # the in-training estimate's
    mesh: jax.sharding.Mesh
    model: LanguageModel
    optimizer: optax.GradientTransformation
    opt_state: optax.OptState
    train_key: jax.Array
    train_chunk: Callable


def prepare(recipe: Recipe, log=print, init_from: str | Path | None = None) -> Prepared:
    """`init_from`: a run directory whose weights and tokenizer the model starts from."""
    cfg, block_size = recipe.trainer, recipe.model.block_size
    initial = Initial.load(init_from) if init_from else None
    corpus = main_first(lambda: prepare_corpus(recipe.data, initial.tokenizer if initial else None,
                                               log=log))
    tokenizer = corpus.tokenizer
    schedule = BatchSchedule.of(cfg.batch_size, cfg.batch_schedule)
    corpus.train.require(max(schedule.sizes) * block_size + 1,
                         f"one batch (trainer.batch_size x model.block_size + 1 = "
                         f"{max(schedule.sizes)} x {block_size} + 1)")
    train_batches = Batches(corpus.train, schedule, block_size, cfg.seed)
    val_batches = Batches(corpus.val, cfg.batch_size, block_size, cfg.seed + 1)
    mesh = make_mesh(recipe)
    check_micro_batches(schedule.sizes, cfg.grad_accum_steps, batch_sharded(mesh))
    model_key, train_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
    model = build_sharded(lambda: with_scan_settings(  # per block of each Stack
        recipe.build(tokenizer.vocab_size, key=model_key), cfg.remat, cfg.unroll_layers), mesh)
    require(model, LanguageModel, f"gptzoo train ({recipe.source.name})")
    model = shard(initial.weights_into(model), mesh) if initial else model
    optimizer = make_optimizer(recipe.optimizer, cfg.max_steps)
    # Placed before a resume restores into them: a restored array keeps its template's sharding.
    opt_state = shard(optimizer.init(eqx.filter(model, eqx.is_array)), mesh)
    train_chunk = make_train_chunk(optimizer, mesh, precision=cfg.precision,
                                   grad_accum_steps=cfg.grad_accum_steps)
    return Prepared(corpus, tokenizer, train_batches, val_batches, mesh, model, optimizer,
                    opt_state, train_key, train_chunk)


def train(recipe: Recipe, run_dir: str | Path | None = None, resume: bool = False,
          reporter: Reporter | None = None, init_from: str | Path | None = None) -> TrainResult:
    """Train `recipe` into `run_dir` (default `runs/<recipe name>`); `resume` continues it;
    `init_from` (a run directory) starts from its weights and tokenizer."""
    run_dir = Path(run_dir or Path("runs") / recipe.name)
    cfg, block_size = recipe.trainer, recipe.model.block_size
    ensure_writable(run_dir)
    p = prepare(recipe, init_from=init_from)
    run = _open_run(recipe, run_dir, p, resume)
    model, opt_state = run.model, run.opt_state  # placed by the rules: see prepare, _resume
    # One compiled program: called eagerly, optax's schedule is a dozen operations, each a
    # dispatch and, the first time, a compilation.
    learning_rate = jax.jit(make_schedule(recipe.optimizer, cfg.max_steps))
    bad_steps = BadSteps(cfg.max_bad_steps, recipe.optimizer.lr)
    loader = Prefetcher(p.train_batches, _plan(run.start, cfg), chunk_sharded(p.mesh))
    reporter = reporter or Reporter(cfg.max_steps, run.start, quiet=not is_main())
    reporter.print(f"training {recipe.name}: {_count(model):,} parameters, "
                   f"{len(jax.devices())} {jax.devices()[0].platform} device(s) in "
                   f"{jax.process_count()} process(es), run dir {run_dir}")

    def due(interval: int) -> bool:
        return step % interval == 0 or step == cfg.max_steps

    step, interrupted = run.start, False
    batch_size = p.train_batches.schedule.size
    with _catch_sigint() as sigint, closing(loader), run.status.recording():
        throughput = Throughput(block_size)
        for first, n, batches in loader:
            throughput.add(batches.shape[:2])
            # A NumPy scalar travels with the call; jnp.int32 would be an operation of its own.
            model, opt_state, stats = p.train_chunk((batches, run.train_key, np.int32(first)),
                                                  model, opt_state)
            bad_steps.count(first, stats.finite)
            step = first + n
            interrupted = agreed_stop(sigint.caught, due(cfg.log_interval)
                                      or due(cfg.checkpoint_interval))
            if due(cfg.log_interval) or interrupted:
                # Waits for the chunk, whose call returned at once on a GPU: part of tokens/s.
                losses, grad_norms, aux_losses = jax.device_get(
                    (stats.loss, stats.grad_norm, stats.aux_loss))
                record = {"step": step, "train_loss": float(losses[-1]),
                          "grad_norm": float(grad_norms[-1]), "bad_steps": bad_steps.take(),
                          "lr": float(learning_rate(step - 1)), "batch_size": batch_size(step - 1),
                          "tokens_per_sec": throughput.tokens_per_sec(),
                          "wall_time": run.status.wall_time()}
                if isinstance(model, AuxLossModel):  # e.g. a mixture of experts' load balancing
                    record["aux_loss"] = float(aux_losses[-1])
                if due(cfg.eval_interval):
                    record.update(_validation_estimate(model, p, step, cfg.eval_steps))
                run.sinks.write(record)
                reporter.log(record)
                bad_steps.stop_if_diverged()  # at records only: no host sync between them
                if run.best is not None and "val_loss" in record:
                    run.best.offer(step, record["val_loss"], model, opt_state, run.meta)
            if due(cfg.checkpoint_interval) or interrupted:
                run.checkpoints.save(step, model, opt_state, run.meta)
            if due(cfg.log_interval) or due(cfg.checkpoint_interval):
                throughput.restart()
            if interrupted:
                break
    run.checkpoints.close()
    if run.best is not None:
        run.best.close()
    run.sinks.close()
    return _finish(run, p, model, step, interrupted, reporter, block_size)


@dataclass
class _Run:
    """A run directory opened for training: the state it starts from and what it writes to."""

    run_dir: Path
    start: int
    model: eqx.Module
    opt_state: optax.OptState
    train_key: jax.Array
    meta: dict  # saved with every checkpoint
    checkpoints: Checkpoints
    best: BestCheckpoint | None  # trainer.keep_best
    sinks: Sinks
    status: RunStatus


def _open_run(recipe: Recipe, run_dir: Path, p: Prepared, resume: bool) -> _Run:
    """Refuse to overwrite a run unless resuming it; restore the newest checkpoint if resuming;
    write the recipe and tokenizer; open the metrics sinks and the run's status."""
    meta = {"tokenizer": p.tokenizer.to_dict(),
            "recipe": {"name": recipe.name, **recipe.to_dict()}}
    if not resume and any(steps.is_dir() and any(steps.iterdir())
                          for steps in (run_dir / "checkpoints", run_dir / BEST / "checkpoints")):
        raise GptzooError(f"{run_dir} already holds checkpoints; pass --resume to continue that "
                          "run or --run-dir NEW_DIR to start a new one")
    checkpoints = Checkpoints(run_dir, keep=recipe.trainer.keep_checkpoints)
    best = BestCheckpoint(run_dir) if recipe.trainer.keep_best else None
    start, model, opt_state, train_key = 0, p.model, p.opt_state, p.train_key
    if resume:
        start, model, opt_state, train_key = _resume(checkpoints, meta, model, opt_state, run_dir)
    meta["key"] = np.asarray(train_key).tolist()
    resume_step = start if resume else None
    sinks = Sinks([])  # the other processes of a multi-host run write none of the run's files
    if is_main():
        save_recipe(recipe, run_dir)
        p.tokenizer.save(run_dir)
        metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=resume_step)
        sinks = open_sinks(recipe, run_dir, metrics, resume_step=resume_step)
        if best is not None:  # a run directory of its own for sample, eval and export-hf
            save_recipe(recipe, best.run_dir)
            p.tokenizer.save(best.run_dir)
    status = RunStatus.begin(run_dir, resume, parameters=_count(model), write=is_main())
    return _Run(run_dir, start, model, opt_state, train_key, meta, checkpoints, best, sinks,
                status)


def _validation_estimate(model, p: Prepared, step: int, eval_steps: int) -> dict[str, float]:
    """`val_loss` and `val_bpb` on `eval_steps` batches of the validation split, different at
    each evaluation step and the same in a resumed run."""
    batches = p.val_batches.on_devices(step * eval_steps, eval_steps, chunk_sharded(p.mesh))
    loss = float(estimate_loss(model, batches, p.mesh))
    return {"val_loss": loss, "val_bpb": _bits_per_byte(loss, p.corpus)}


def _finish(run: _Run, p: Prepared, model, step: int, interrupted: bool, reporter: Reporter,
            block_size: int) -> TrainResult:
    """Evaluate on the whole validation split unless interrupted (a Ctrl-C here stops as one
    during training does: the last step is saved), and record how the run ended."""
    if not interrupted:
        try:
            with run.status.recording():
                result = evaluate(model, p.corpus.val, block_size,
                                  bytes_per_token=p.corpus.val.bytes_per_token, mesh=p.mesh)
        except KeyboardInterrupt:
            interrupted = True
    reporter.close()
    if interrupted:
        run.status.end("interrupted", step=step)
        reporter.print(f"interrupted: saved step {step} in {run.run_dir}; continue with --resume")
        return TrainResult(model, p.tokenizer, run.run_dir, step, None, True)
    run.status.end("finished", step=step, val_loss=result.loss)
    reporter.print(f"final val loss {result.loss:.4f} ({result.bits_per_token:.4f} bits/token, "
                   f"{result.bits_per_byte:.4f} bits/byte) over the whole validation split "
                   f"({result.n_tokens:,} tokens)")
    if run.best is not None and run.best.step is not None:
        reporter.print(f"lowest val loss of the evaluations in training {run.best.val_loss:.4f} "
                       f"at step {run.best.step}: {run.best.run_dir} (gptzoo sample --ckpt "
                       f"{run.best.run_dir})")
    return TrainResult(model, p.tokenizer, run.run_dir, step, result.loss, False,
                       result.bits_per_byte)


def _bits_per_byte(loss: float, corpus: Corpus) -> float:
    return loss / math.log(2) / corpus.val.bytes_per_token


def _plan(start: int, cfg) -> list[tuple[int, int]]:
    """(first step, number of steps) of every chunk from `start` to the end."""
    plan = []
    while start < cfg.max_steps:
        plan.append((start, _next_boundary(start, cfg) - start))
        start += plan[-1][1]
    return plan


def _next_boundary(step: int, cfg) -> int:
    """Chunks end at every event, at absolute steps: a resumed run chunks like an unbroken one;
    and where the batch size changes, so that a chunk's batches have one shape."""
    intervals = (cfg.steps_per_call, cfg.log_interval, cfg.eval_interval, cfg.checkpoint_interval)
    change = BatchSchedule.of(cfg.batch_size, cfg.batch_schedule).next_change(step)
    return min([cfg.max_steps] + [(step // k + 1) * k for k in intervals]
               + ([] if change is None else [change]))


def _resume(checkpoints: Checkpoints, meta: dict, model, opt_state, run_dir: Path):
    """`(step, model, opt_state, key)` from the newest readable checkpoint; unreadable newer ones
    are reported and removed, so that the resumed run saves those steps afresh."""

    def restore(step: int):
        saved = checkpoints.meta(step)
        _check_resumable(saved, meta, run_dir)
        return saved, checkpoints.restore(step, model, opt_state)

    found = checkpoints.restore_newest(restore, discard_unreadable=True)
    if found is None:
        raise GptzooError(f"no checkpoint in {run_dir} to resume; drop --resume to start a new run")
    step, (saved, (model, opt_state)) = found
    return step, model, opt_state, jnp.asarray(saved["key"], dtype=jnp.uint32)


def _check_resumable(saved: dict, current: dict, run_dir: Path) -> None:
    if saved["tokenizer"] != current["tokenizer"]:
        raise GptzooError(f"the tokenizer of this data (data.tokenizer, data.path) differs from "
                          f"the checkpoint's in {run_dir}; resume with the data.path and "
                          f"data.tokenizer of {run_dir}/recipe.json")
    was, now = saved["recipe"]["model"], current["recipe"]["model"]
    changed = [f"model.{k}={now.get(k)!r} (checkpoint: {was.get(k)!r})"
               for k in sorted(was.keys() | now.keys() - {"scan_layers"})  # a layout, restorable
               if was.get(k) != now.get(k)]
    if changed:
        raise GptzooError(f"--resume with a changed model: {', '.join(changed)}; resume with the "
                          f"settings of {run_dir}/recipe.json or start a new run with --run-dir")


def _count(model) -> int:
    return sum(a.size for a in jax.tree.leaves(eqx.filter(model, eqx.is_array)))


class _SigintFlag:
    caught = False


@contextmanager
def _catch_sigint():
    """The first Ctrl-C asks the loop to save and stop after the current chunk; a second one
    interrupts at once."""
    flag = _SigintFlag()

    def handler(signum, frame):
        flag.caught = True
        signal.signal(signal.SIGINT, previous)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
