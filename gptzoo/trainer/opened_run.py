"""A run directory opened for training: the state the run starts from (fresh or resumed), and what
it writes to (checkpoints, the best checkpoint, metrics sinks, status), released together."""

from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptzoo.errors import GptzooError
from gptzoo.lora.run import check_resumable_base
from gptzoo.recipe import Recipe, save_recipe
from gptzoo.trainer.checkpoint import BEST, BestCheckpoint, Checkpoints
from gptzoo.trainer.distributed import is_main
from gptzoo.trainer.divergence import REFERENCE_KEY, FallBack, LastGoodEvaluation, fall_back
from gptzoo.trainer.flops import count_parameters
from gptzoo.trainer.guard import BadSteps
from gptzoo.trainer.metrics_file import METRICS_FILE, MetricsLog
from gptzoo.trainer.prepared import Prepared
from gptzoo.trainer.progress import Reporter
from gptzoo.trainer.run_status import RunStatus
from gptzoo.trainer.sinks import Sinks, open_sinks


@dataclass
class OpenedRun:
    """What `open_run` yields."""

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
    last_good: LastGoodEvaluation  # the reference each checkpoint records: see divergence.py
    saved: int | None  # the newest step saved
    refused: bool = False  # a save was refused in the current streak of skipped steps

    def save(self, step: int, model, opt_state, bad_steps: BadSteps, reporter: Reporter) -> None:
        """Save `step`, unless its last step was skipped: a run in a streak of non-finite steps
        may be diverging, and its last checkpoint is then the one to fall back to."""
        if bad_steps.skipping():
            if not self.refused:
                reporter.print(f"step {step} not saved: its last {bad_steps.streak} step(s) were "
                               "skipped (non-finite loss or gradient); no checkpoint is saved "
                               "until a step is finite again")
            self.refused = True
            return
        self.checkpoints.save(step, model, opt_state,
                              {**self.meta, REFERENCE_KEY: self.last_good.saved()})
        self.saved, self.refused = step, False

    def fall_back(self, p: Prepared, model, eval_steps: int) -> FallBack:
        """The checkpoint a diverged run keeps, checked on the validation batches of its
        reference evaluation; newer ones are set aside. `model`: the run's now (a LoRA run's
        checkpoints hold its adapters, which go back on its frozen weights)."""

        def val_loss(saved, step: int) -> float:
            return p.validation_estimate(p.trained.restored(model, saved), step,
                                         eval_steps)["val_loss"]

        return fall_back(self.checkpoints, p.trained.checkpointed(model), val_loss,
                         p.tokenizer.vocab_size, move=is_main())


@contextmanager
def open_run(recipe: Recipe, run_dir: Path, p: Prepared, resume: bool) -> Iterator[OpenedRun]:
    """Refuse to overwrite a run unless resuming it; restore the newest checkpoint if resuming;
    write the recipe and tokenizer; open the metrics sinks and the run's status. Whatever it
    opened is closed on the way out, by an exception too."""
    meta = {"tokenizer": p.tokenizer.to_dict(),
            "recipe": {"name": recipe.name, **recipe.to_dict()}, **p.trained.meta(),
            "corpus": {"split_byte": p.corpus.manifest["split_byte"],
                       **{f"{name}_tokens": len(split) for name, split in
                          (("train", p.corpus.train), ("val", p.corpus.val))}}}
    if not resume and any(steps.is_dir() and any(steps.iterdir())
                          for steps in (run_dir / "checkpoints", run_dir / BEST / "checkpoints")):
        raise GptzooError(f"{run_dir} already holds checkpoints; pass --resume to continue that "
                          "run or --run-dir NEW_DIR to start a new one")
    with ExitStack() as opened:
        checkpoints = opened.enter_context(
            closing(Checkpoints(run_dir, keep=recipe.trainer.keep_checkpoints)))
        best = opened.enter_context(closing(BestCheckpoint(run_dir))) \
            if recipe.trainer.keep_best else None
        start, model, opt_state, train_key = 0, p.model, p.opt_state, p.train_key
        last_good = LastGoodEvaluation(p.tokenizer.vocab_size)
        if resume:
            start, restored, opt_state, saved = _resume(
                checkpoints, meta, p.trained.checkpointed(model), opt_state, run_dir)
            model = p.trained.restored(model, restored)
            train_key = jnp.asarray(saved["key"], dtype=jnp.uint32)
            last_good = LastGoodEvaluation(p.tokenizer.vocab_size, saved.get(REFERENCE_KEY))
        meta["key"] = np.asarray(train_key).tolist()
        sinks = opened.enter_context(closing(_open_sinks(recipe, run_dir, p, best,
                                                         start if resume else None)))
        status = RunStatus.begin(run_dir, resume, parameters=count_parameters(model),
                                 write=is_main())
        yield OpenedRun(run_dir, start, model, opt_state, train_key, meta, checkpoints, best,
                        sinks, status, last_good, start if resume else None)


def _open_sinks(recipe: Recipe, run_dir: Path, p: Prepared, best: BestCheckpoint | None,
                resume_step: int | None) -> Sinks:
    """Write the recipe and tokenizer (for `best` too: a run directory of its own for sample,
    eval and export-hf) and open the metrics sinks; the other processes of a multi-host run
    write none of the run's files."""
    if not is_main():
        return Sinks([])
    save_recipe(recipe, run_dir)
    p.tokenizer.save(run_dir)
    if best is not None:
        save_recipe(recipe, best.run_dir)
        p.tokenizer.save(best.run_dir)
    cfg = recipe.trainer
    metrics = MetricsLog(run_dir / METRICS_FILE, resume_step=resume_step,
                         logged=lambda step: cfg.due(step, cfg.log_interval))
    return open_sinks(recipe, run_dir, metrics, resume_step=resume_step)


def _resume(checkpoints: Checkpoints, meta: dict, model, opt_state, run_dir: Path):
    """`(step, model, opt_state, record)` from the newest readable checkpoint; unreadable newer
    ones are reported and removed, so that the resumed run saves those steps afresh."""

    def restore(step: int):
        saved = checkpoints.meta(step)
        _check_resumable(saved, meta, run_dir)
        return saved, checkpoints.restore(step, model, opt_state)

    found = checkpoints.restore_newest(restore, discard_unreadable=True)
    if found is None:
        raise GptzooError(f"no checkpoint in {run_dir} to resume; drop --resume to start a new run")
    step, (saved, (model, opt_state)) = found
    return step, model, opt_state, saved


def _check_resumable(saved: dict, current: dict, run_dir: Path) -> None:
    if "imported_from" in saved:
        raise GptzooError(f"{run_dir} holds a model imported from {saved['imported_from']}, with "
                          "no training to resume; train on from it with --init-from "
                          f"{run_dir} and a new --run-dir")
    check_resumable_base(saved, current, run_dir)
    if saved.get("corpus", current["corpus"]) != current["corpus"]:  # older checkpoints: none
        raise GptzooError(f"the corpus (data.path) changed since {run_dir}'s checkpoint (its "
                          f"splits were {saved['corpus']}, now {current['corpus']}): resumed, "
                          "the run would not continue as it was, and text it validated on could "
                          f"train; restore the data, or train on with --init-from {run_dir} and "
                          "a new --run-dir")
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
