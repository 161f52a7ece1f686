"""The global batch size of every step (`trainer.batch_schedule`), and where each step's samples
start in the stream of windows, in closed form, so a batch stays a pure function of its step; and
the one check that every batch splits into its micro-batches and over its devices."""

import bisect
from dataclasses import dataclass

from gptzoo.errors import GptzooError

_FORM = "it must list [step, batch size] pairs with steps increasing from 0 and positive sizes"


@dataclass(frozen=True)
class BatchSchedule:
    """`pairs`: `((first step, batch size), ...)`, steps increasing from 0; each size holds from
    its step until the next listed one."""

    pairs: tuple[tuple[int, int], ...]

    def __post_init__(self):
        steps, sizes = [s for s, _ in self.pairs], [b for _, b in self.pairs]
        if not steps or steps[0] != 0 or steps != sorted(set(steps)) or min(sizes) < 1:
            raise ValueError(_FORM)

    @classmethod
    def of(cls, batch_size: int, schedule: list | None = None) -> "BatchSchedule":
        """`schedule` (`[(step, size), ...]`, pairs as lists or tuples) if given, else
        `batch_size` at every step."""
        pairs = [(0, batch_size)] if schedule is None else schedule
        try:
            return cls(tuple((int(s), int(b)) for s, b in pairs))
        except (TypeError, ValueError):  # not a list of pairs of integers
            raise ValueError(_FORM) from None

    @property
    def sizes(self) -> list[int]:
        return [b for _, b in self.pairs]

    def size(self, step: int) -> int:
        return self.pairs[self._segment(step)][1]

    def offset(self, step: int) -> int:
        """Samples drawn by all steps before `step`: the index of `step`'s first sample."""
        i = self._segment(step)
        done = sum(b * (self.pairs[j + 1][0] - s) for j, (s, b) in enumerate(self.pairs[:i]))
        return done + (step - self.pairs[i][0]) * self.pairs[i][1]

    def next_change(self, step: int) -> int | None:
        """The first step after `step` whose batch size is listed anew, or None."""
        i = self._segment(step) + 1
        return self.pairs[i][0] if i < len(self.pairs) else None

    def _segment(self, step: int) -> int:
        return bisect.bisect_right([s for s, _ in self.pairs], step) - 1


def checked_schedule(batch_size: int, schedule: list | None, grad_accum_steps: int,
                     shards: int = 1, over: str = "") -> BatchSchedule:
    """The schedule of `trainer.batch_size` and `trainer.batch_schedule`, once it is well formed,
    every global batch splits into `grad_accum_steps` micro-batches, and every micro-batch over
    `shards` devices (`over` names the mesh axes behind them); else a one-line error naming the
    key to change. The recipe checks with one device when it loads, the trainer with its mesh."""
    try:
        checked = BatchSchedule.of(batch_size, schedule)
    except ValueError as e:
        raise GptzooError(f"trainer.batch_schedule={schedule!r}: {e}; e.g. --set "
                          "trainer.batch_schedule='[[0,16],[200,32]]'") from None
    for size in checked.sizes:
        name = (f"trainer.batch_size={size}" if schedule is None else
                f"trainer.batch_schedule's batch {size}")
        if size % grad_accum_steps:
            raise GptzooError(f"{name} is not divisible by trainer.grad_accum_steps="
                              f"{grad_accum_steps}; make each batch a multiple of it")
        if size // grad_accum_steps % shards:
            split = name if grad_accum_steps == 1 else (
                f"a micro-batch of {name} / trainer.grad_accum_steps={grad_accum_steps} = "
                f"{size // grad_accum_steps} rows")
            raise GptzooError(f"{split} does not split over {shards} devices ({over}); use a "
                              f"multiple of {grad_accum_steps * shards}, or change the mesh axes "
                              "named there")
    return checked
