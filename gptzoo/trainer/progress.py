"""What a run shows while it trains: a rich progress bar on a terminal (loss, last val loss,
tokens/s, ETA), else plain lines; and its tokens/s. Its records go to `metrics_file`."""

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def format_record(record: dict[str, Any]) -> str:
    parts = [f"loss {record['train_loss']:.4f}"]
    if "val_loss" in record:
        parts.append(f"val {record['val_loss']:.4f}")
    parts.append(f"lr {record['lr']:.2e}")
    if record.get("tokens_per_sec"):
        parts.append(f"{record['tokens_per_sec']:,.0f} tok/s")
    return " | ".join(parts)


def format_bar(record: dict[str, Any], last: dict[str, Any]) -> str:
    """The bar's status: this record's loss, with the latest val loss and tokens/s seen so far
    (`last` keeps them, as most records carry neither)."""
    last.update({k: record[k] for k in ("val_loss", "tokens_per_sec") if record.get(k)})
    parts = [f"loss {record['train_loss']:.4f}"]
    if "val_loss" in last:
        parts.append(f"val {last['val_loss']:.4f}")
    if "tokens_per_sec" in last:
        parts.append(f"{last['tokens_per_sec']:,.0f} tok/s")
    return " | ".join(parts)


class Throughput:
    """Training tokens per second since the last `restart()`, for windows of `block_size`
    tokens; `None` for a stretch in which a chunk of a new shape compiled (not steady state)."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.compiled: set[tuple[int, int]] = set()
        self.restart()

    def restart(self) -> None:
        self.clock, self.tokens, self.steady = time.perf_counter(), 0, True

    def add(self, chunk_shape: tuple[int, int]) -> None:
        """A chunk of `(steps, batch)` windows dispatched; a shape not seen before compiles."""
        self.steady &= chunk_shape in self.compiled
        self.compiled.add(chunk_shape)
        self.tokens += chunk_shape[0] * chunk_shape[1] * self.block_size

    def tokens_per_sec(self) -> float | None:
        """Read once the chunks' results are: on a GPU a call returns before its work is done."""
        return self.tokens / (time.perf_counter() - self.clock) if self.steady else None


class Reporter:
    """`quiet`: show nothing (the other processes of a multi-host run)."""

    def __init__(self, max_steps: int, start_step: int, console: Console | None = None,
                 quiet: bool = False):
        self.console = console or Console()
        self.quiet = quiet
        self.max_steps = max_steps
        self.started = time.perf_counter()
        self.start_step = start_step
        self.bar = None
        self.last: dict[str, Any] = {}
        if self.console.is_terminal and not quiet:
            self.bar = Progress(
                TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                TextColumn("{task.fields[status]}"), TextColumn("eta"), TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.bar.add_task("train", total=max_steps, completed=start_step, status="")
            self.bar.start()

    def log(self, record: dict[str, Any]) -> None:
        if self.quiet:
            return
        line = format_record(record)
        if self.bar is not None:
            status = format_bar(record, self.last)
            self.bar.update(self.task, completed=record["step"], status=status)
            if "val_loss" in record:
                self.bar.console.print(f"step {record['step']}: {line}")
        else:
            done = record["step"] - self.start_step
            elapsed = time.perf_counter() - self.started
            eta = elapsed / max(done, 1) * (self.max_steps - record["step"])
            step = f"step {record['step']:>6}/{self.max_steps}"
            print(f"{step} | {line} | eta {eta:.0f}s", flush=True)

    def print(self, message: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.console.print(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
