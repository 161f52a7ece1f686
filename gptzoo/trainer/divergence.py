"""What a diverged run falls back to: the newest checkpoint whose parameters still evaluate well,
checked by evaluating them, with every newer one set aside (moved to `RUN_DIR/set_aside`, not
deleted) so that `--resume` starts from the checked one. Checking rather than trusting the step
guard matters: one finite step can set every weight to ~1e30 just before the non-finite steps that
stop the run, and a checkpoint written after it holds finite, useless weights."""

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import equinox as eqx

from gptzoo.trainer.checkpoint import Checkpoints, UnreadableCheckpoint

# How far above its reference a loss may lie and still count as good: room for evaluation noise
# and some overfitting between two evaluations, far below what a blown-up model scores.
TOLERANCE = 0.1
SET_ASIDE = "set_aside"  # RUN_DIR/set_aside/<step>: the checkpoints a fall-back moved away
REFERENCE_KEY = "last_good_eval"  # in a checkpoint's record: [step, val_loss] or None


class LastGoodEvaluation:
    """The run's last good evaluation: a finite validation loss at most `TOLERANCE` above the
    previous good one's (above ln(vocab size), a uniform guess's, for the first). Each checkpoint
    records it (`saved()`) as the reference it is checked against after a divergence.

    **Arguments:**

    - `vocab_size`: the tokenizer's; sets the bound before any good evaluation.
    - `saved`: the `saved()` of the checkpoint a resumed run starts from (None: none yet).
    """

    def __init__(self, vocab_size: int, saved: list | None = None):
        self.uniform_loss = math.log(vocab_size)
        self.step, self.val_loss = saved if saved else (None, None)

    def bound(self) -> float:
        reference = self.uniform_loss if self.val_loss is None else self.val_loss
        return reference * (1 + TOLERANCE)

    def offer(self, step: int, val_loss: float) -> None:
        if math.isfinite(val_loss) and val_loss <= self.bound():
            self.step, self.val_loss = step, val_loss

    def saved(self) -> list | None:
        return None if self.step is None else [self.step, self.val_loss]


@dataclass
class FallBack:
    """The outcome: the checkpoint kept (None: none passed) and the steps set aside, newest
    first, each with why."""

    kept: int | None
    why_kept: str = ""
    set_aside: list[tuple[int, str]] = field(default_factory=list)
    folder: Path | None = None

    def describe(self) -> str:
        aside = "" if not self.set_aside else (
            f"; set aside in {self.folder}: " + ", ".join(f"step {s} ({why})"
                                                         for s, why in self.set_aside))
        if self.kept is None:
            return "no checkpoint was saved" if not self.set_aside else \
                f"no checkpoint evaluates as well as the run did{aside}"
        return f"checkpoint step {self.kept} is kept ({self.why_kept}){aside}"


def fall_back(checkpoints: Checkpoints, template: eqx.Module,
              val_loss: Callable[[eqx.Module, int], float], vocab_size: int,
              move: bool = True) -> FallBack:
    """Check the checkpoints newest first and keep the first whose parameters (restored into
    `template`) give a finite `val_loss(model, step)` on the validation batches of the last good
    evaluation it recorded, at most `TOLERANCE` above that evaluation's; set aside the newer
    ones (`move=False`: only name them, for the processes of a multi-host run but the first)."""
    result = FallBack(kept=None, folder=checkpoints.directory.parent / SET_ASIDE)
    for step in sorted(checkpoints.manager.all_steps(), reverse=True):
        good, why = _check(checkpoints, step, template, val_loss, vocab_size)
        if good:
            result.kept, result.why_kept = step, why
            break
        result.set_aside.append((step, why))
    if move:
        set_aside(checkpoints, [step for step, _ in result.set_aside], result.folder)
    return result


def _check(checkpoints: Checkpoints, step: int, template, val_loss, vocab_size: int
           ) -> tuple[bool, str]:
    """Whether checkpoint `step` evaluates within bounds, and the figures that say so."""
    try:
        reference = LastGoodEvaluation(vocab_size, checkpoints.meta(step).get(REFERENCE_KEY))
        batches_of = 0 if reference.step is None else reference.step
        loss = val_loss(checkpoints.restore(step, template), batches_of)
    except UnreadableCheckpoint as e:
        return False, str(e)
    against = (f"a uniform guess's {reference.uniform_loss:.4f}" if reference.step is None else
               f"{reference.val_loss:.4f} at the step {reference.step} evaluation, on its batches")
    good = math.isfinite(loss) and loss <= reference.bound()
    return good, f"validation loss {loss:.4f} against {against}"


def set_aside(checkpoints: Checkpoints, steps: list[int], folder: Path) -> None:
    """Move the folders of checkpoint `steps` into `folder` (a name taken by an earlier fall-back
    gets a suffix), where `--resume` no longer finds them."""
    for step in steps:
        target, n = folder / str(step), 1
        while target.exists():
            n += 1
            target = folder / f"{step}-{n}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.move(checkpoints.directory / str(step), target)
    checkpoints.manager.reload()
