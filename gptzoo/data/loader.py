"""Batches from token shards: which windows each step sees, and a background thread that reads
and copies the next chunks' batches to the devices while the current chunk trains.

Batch contents are a pure function of (seed, step): every epoch is a seeded permutation of
windows `block_size` apart, shifted by a seeded offset, and step `s` takes the samples
`[offset(s), offset(s) + size(s))` of that stream (`BatchSchedule`: the offset is the closed-form
count of samples before `s`, so the batch size may change during a run), so `--resume` sees
exactly the windows an unbroken run would. Rows are addressed by their index in the global batch,
so each process of a multi-host run reads only the rows its devices hold (`on_devices`).
"""

import queue
import threading
from collections.abc import Iterator

import jax
import numpy as np
from jaxtyping import Int

from gptzoo.data.batch_schedule import BatchSchedule
from gptzoo.data.shards import TokenSplit


class Batches:
    """Windows of `block_size + 1` tokens (inputs and next-token targets) from `split`."""

    def __init__(self, split: TokenSplit, batch_size: int | BatchSchedule, block_size: int,
                 seed: int):
        """`batch_size`: the same for every step, or a `BatchSchedule`."""
        split.require(block_size + 1, "one window (model.block_size + 1)")
        self.split, self.block_size = split, block_size
        self.schedule = (batch_size if isinstance(batch_size, BatchSchedule)
                         else BatchSchedule.of(batch_size))
        self.seed = seed
        # Each epoch shifts its windows by an offset below `spread`; all fit for every offset.
        self.spread = min(block_size, len(split) - block_size)
        self.n_windows = (len(split) - self.spread) // block_size
        self._epoch: tuple[int, int, np.ndarray] | None = None

    def starts(self, step: int, n_steps: int = 1, rows: range | None = None
               ) -> Int[np.ndarray, " n_steps_x_rows"]:
        """Token offsets of the windows in rows `rows` (default: all) of batches `step` to
        `step + n_steps - 1` (one batch size: a chunk ends where the schedule changes it), batch
        by batch."""
        size, change = self.schedule.size(step), self.schedule.next_change(step)
        if change is not None and change < step + n_steps:
            raise ValueError(f"steps {step}..{step + n_steps - 1} span the batch size change at "
                             f"step {change}; read them as two chunks")
        rows = np.arange(size) if rows is None else np.asarray(rows, dtype=np.int64)
        steps = np.arange(n_steps, dtype=np.int64)
        index = (self.schedule.offset(step) + steps[:, None] * size + rows[None, :]).reshape(-1)
        epochs, positions = np.divmod(index, self.n_windows)
        starts = np.empty(len(index), np.int64)
        for epoch in np.unique(epochs):  # a chunk spans at most a few epochs
            offset, order = self._order(int(epoch))
            here = epochs == epoch
            starts[here] = offset + self.block_size * order[positions[here]]
        return starts

    def chunk(self, step: int, n_steps: int, rows: range | None = None
              ) -> Int[np.ndarray, "n_steps rows block_plus_1"]:
        """The batches of steps `step .. step + n_steps - 1`, stacked."""
        windows = self.split.windows(self.starts(step, n_steps, rows), self.block_size + 1)
        return windows.reshape(n_steps, -1, self.block_size + 1)

    def on_devices(self, step: int, n_steps: int, sharding: jax.sharding.Sharding
                   ) -> Int[jax.Array, "n_steps batch block_plus_1"]:
        """`chunk(step, n_steps)` as one global array laid out by `sharding`, of which this
        process reads only the rows its own devices hold (every row when it is the only one)."""
        size = self.schedule.size(step)
        shape = (n_steps, size, self.block_size + 1)
        held = sharding.addressable_devices_indices_map(shape).values()
        rows = np.unique(np.concatenate([np.arange(size)[index[1]] for index in held]))
        return jax.make_array_from_process_local_data(sharding, self.chunk(step, n_steps, rows),
                                                      shape)

    def _order(self, epoch: int) -> tuple[int, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:  # one epoch's permutation in memory
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch = (epoch, int(rng.integers(self.spread)), rng.permutation(self.n_windows))
        return self._epoch[1], self._epoch[2]


class Prefetcher:
    """Yields `(step, n_steps, batches)` for each `(step, n_steps)` of `plan`, with `batches` of
    `Batches.chunk` already on the devices (sharded by `sharding`), read `depth` chunks ahead by
    a background thread."""

    def __init__(self, batches: Batches, plan: list[tuple[int, int]], sharding, depth: int = 2):
        self.batches, self.plan, self.sharding = batches, plan, sharding
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._fill, daemon=True, name="gptzoo-loader")
        self.thread.start()

    def _fill(self) -> None:
        try:
            for step, n in self.plan:
                item = (step, n, self.batches.on_devices(step, n, self.sharding))
                if not self._put(item):
                    return
        except BaseException as e:  # re-raised in the training thread
            self._put(e)
            return
        self._put(None)

    def _put(self, item) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[tuple[int, int, jax.Array]]:
        while (item := self.queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
