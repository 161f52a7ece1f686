"""Counting the steps the train step skipped because their loss or gradients were not finite,
and stopping a run that keeps producing them."""

import jax
import numpy as np

from gptzoo.errors import GptzooError
from gptzoo.trainer.divergence import FallBack


class BadSteps:
    """Counts skipped steps; `diverged()` once `limit` of them came in a row."""

    def __init__(self, limit: int, lr: float):
        self.limit, self.lr = limit, lr
        self.streak = 0
        self.since_record = 0
        self.diverged_at: int | None = None
        self.pending: list[tuple[int, jax.Array]] = []

    def count(self, first_step: int, finite: jax.Array) -> None:
        """Note a chunk whose steps `first_step + 1, ...` were `finite` or skipped. The flags stay
        on the device until the next record or check, so counting adds no host sync."""
        self.pending.append((first_step, finite))

    def _settle(self) -> None:
        for first_step, finite in self.pending:
            for i, ok in enumerate(np.asarray(finite)):
                self.streak = 0 if ok else self.streak + 1
                self.since_record += not ok
                if self.streak >= self.limit and self.diverged_at is None:
                    self.diverged_at = first_step + i + 1
        self.pending.clear()

    def take(self) -> int:
        """The skipped steps since the previous call (a metrics record's `bad_steps`)."""
        self._settle()
        n, self.since_record = self.since_record, 0
        return n

    def skipping(self) -> bool:
        """Whether the latest step was skipped: a checkpoint now would save a run mid-streak."""
        self._settle()
        return self.streak > 0

    def diverged(self) -> bool:
        self._settle()
        return self.diverged_at is not None

    def error(self, fall_back: FallBack, ended_at: int | None = None) -> GptzooError:
        """The error that stops a diverged run, naming the checkpoint it falls back to; with
        `ended_at`, of a run whose last steps up to that one were skipped."""
        lower = f"a lower optimizer.lr than {self.lr:g}, e.g. --set optimizer.lr={self.lr / 3:.2g}"
        then = (f"--resume it with {lower}" if fall_back.kept is not None else
                f"start again (without --resume) with {lower}")
        streak = (f"{self.limit} steps in a row up to step {self.diverged_at}" if ended_at is None
                  else f"its last {self.streak} step(s), up to step {ended_at},")
        return GptzooError(
            f"training diverged: {streak} had a non-finite loss or gradient and were skipped "
            f"(trainer.max_bad_steps); {fall_back.describe()}; {then}")
