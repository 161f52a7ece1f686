"""The generic training loop: recipe in, trained model and run directory out."""

import signal
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from gptzoo.data import BatchSchedule, Prefetcher, Tokenizer
from gptzoo.lora.run import recorded_base
from gptzoo.models.protocol import AuxLossModel, LanguageModel
from gptzoo.recipe import Recipe
from gptzoo.trainer.distributed import agreed_stop, is_main, split_cpu
from gptzoo.trainer.evaluate import evaluate
from gptzoo.trainer.flops import count_parameters
from gptzoo.trainer.guard import BadSteps
from gptzoo.trainer.opened_run import OpenedRun, open_run
from gptzoo.trainer.optimizer import make_schedule
from gptzoo.trainer.prepared import Prepared, prepare
from gptzoo.trainer.progress import Reporter, Throughput
from gptzoo.trainer.run_dir import ensure_writable, remove_if_unused, training_lock
from gptzoo.trainer.sharding import chunk_sharded


@dataclass
class TrainResult:
    model: LanguageModel
    tokenizer: Tokenizer
    run_dir: Path
    step: int
    val_loss: float | None  # over the whole validation split; None if interrupted
    interrupted: bool
    val_bpb: float | None = None  # the same in bits per UTF-8 byte: comparable across tokenizers


def train(recipe: Recipe, run_dir: str | Path | None = None, resume: bool = False,
          reporter: Reporter | None = None, init_from: str | Path | None = None) -> TrainResult:
    """Train `recipe` into `run_dir` (default `runs/<recipe name>`); `resume` continues it;
    `init_from` (a run directory) starts from its weights and tokenizer. Checkpoint managers,
    metrics sinks, the loader's thread and the progress bar are released however it ends.
    Called before any other JAX operation, it splits a CPU into `mesh.cpu_devices` devices."""
    split_cpu(recipe)
    run_dir = Path(run_dir or Path("runs") / recipe.name)
    created = not run_dir.exists()
    ensure_writable(run_dir)
    with ExitStack() as opened:
        if is_main():  # the process that writes the run's files
            if created:  # a run that fails before writing anything leaves no folder behind
                opened.callback(remove_if_unused, run_dir)
            opened.enter_context(training_lock(run_dir))
        if resume and init_from is None and recipe.lora.rank:  # the base its checkpoints name
            init_from = recorded_base(run_dir)
        p = prepare(recipe, init_from=init_from)
        run = opened.enter_context(open_run(recipe, run_dir, p, resume))
        reporter = reporter or Reporter(recipe.trainer.max_steps, run.start, quiet=not is_main())
        opened.callback(reporter.close)
        reporter.print(f"training {recipe.name}: {count_parameters(run.model):,} parameters"
                       f"{p.trained.describe(run.model)}, {len(jax.devices())} "
                       f"{jax.devices()[0].platform} device(s) in {jax.process_count()} "
                       f"process(es), run dir {run_dir}")
        model, step, interrupted = _run_steps(recipe, p, run, reporter)
        return _finish(run, p, model, step, interrupted, reporter, recipe.model.block_size)


def _run_steps(recipe: Recipe, p: Prepared, run: OpenedRun, reporter: Reporter):
    """`(model, last step, interrupted)` after training from `run.start` to the end or to a
    Ctrl-C: records, evaluations and checkpoints at their intervals."""
    cfg = recipe.trainer
    model, opt_state = run.model, run.opt_state  # placed by the rules: see prepare, open_run
    # One compiled program: called eagerly, optax's schedule is a dozen operations, each a
    # dispatch and, the first time, a compilation.
    learning_rate = jax.jit(make_schedule(recipe.optimizer, cfg.max_steps))
    bad_steps = BadSteps(cfg.max_bad_steps, recipe.optimizer.lr)
    loader = Prefetcher(p.train_batches, _plan(run.start, cfg), chunk_sharded(p.mesh))

    def due(interval: int) -> bool:
        return cfg.due(step, interval)

    step, interrupted = run.start, False
    with _catch_sigint() as sigint, closing(loader), run.status.recording():
        throughput = Throughput(recipe.model.block_size)
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
                record = _record(step, stats, model, p, run, bad_steps, learning_rate,
                                 throughput)
                if due(cfg.eval_interval):
                    record.update(p.validation_estimate(model, step, cfg.eval_steps))
                run.sinks.write(record)
                reporter.log(record)
                if bad_steps.diverged():  # at records only: no host sync between them
                    raise bad_steps.error(run.fall_back(p, model, cfg.eval_steps))
                if "val_loss" in record:
                    run.last_good.offer(step, record["val_loss"])
                    if run.best is not None:
                        run.best.offer(step, record["val_loss"], p.trained.checkpointed(model),
                                       opt_state, run.meta)
            if due(cfg.checkpoint_interval) or interrupted:
                run.save(step, p.trained.checkpointed(model), opt_state, bad_steps, reporter)
            if due(cfg.log_interval) or due(cfg.checkpoint_interval):
                throughput.restart()
            if interrupted:
                break
        if not interrupted and bad_steps.skipping():  # it would end with no last checkpoint
            raise bad_steps.error(run.fall_back(p, model, cfg.eval_steps), ended_at=step)
    return model, step, interrupted


def _record(step: int, stats, model, p: Prepared, run: OpenedRun, bad_steps: BadSteps,
            learning_rate, throughput: Throughput) -> dict:
    """A log step's record of the chunk that ended at `step`, its last step's figures; waits
    for the chunk, whose call returned at once on a GPU, so the wait is part of tokens/s."""
    losses, grad_norms, aux_losses = jax.device_get((stats.loss, stats.grad_norm, stats.aux_loss))
    record = {"step": step, "train_loss": float(losses[-1]),
              "grad_norm": float(grad_norms[-1]), "bad_steps": bad_steps.take(),
              "lr": float(learning_rate(step - 1)),
              "batch_size": p.train_batches.schedule.size(step - 1),
              "tokens_per_sec": throughput.tokens_per_sec(),
              "wall_time": run.status.wall_time()}
    if isinstance(model, AuxLossModel):  # e.g. a mixture of experts' load balancing
        record["aux_loss"] = float(aux_losses[-1])
    return record


def _finish(run: OpenedRun, p: Prepared, model, step: int, interrupted: bool, reporter: Reporter,
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
        saved = f"saved step {step}" if run.saved == step else \
            f"stopped at step {step}, not saved (skipped steps); newest saved: {run.saved}"
        reporter.print(f"interrupted: {saved} in {run.run_dir}; continue with --resume")
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
