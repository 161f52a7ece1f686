"""`RUN_DIR/metrics.jsonl`: one JSON object per logged step (see `gptzoo.trainer.sinks` for its
keys), written by `MetricsLog` and read by `read_records`, the one reader of the run's records."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gptzoo.atomic import write_text_atomic
from gptzoo.errors import GptzooError

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends one JSON object per logged step. Opening it for a resumed run drops the records
    past the checkpoint's step, and a last line cut short by a killed process, so the file reads
    as one uninterrupted run; that rewrite goes through a temporary file and an atomic rename.

    **Arguments:**

    - `path`: the file, `RUN_DIR/metrics.jsonl`.
    - `resume_step`: the step a resumed run continues from; None starts the file afresh.
    - `logged`: whether a step is one the run logs at; a resumed run drops the record an
        interruption wrote at another step, which an uninterrupted run does not have.
    """

    def __init__(self, path: Path, resume_step: int | None,
                 logged: Callable[[int], bool] = lambda step: True):
        self.path = path
        if resume_step is None:
            write_text_atomic(path, "")
        elif path.exists():
            kept = [r for r in _read(path) if r["step"] <= resume_step and logged(r["step"])]
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of `RUN_DIR/metrics.jsonl`, without a last line cut short by a killed run
    (or still being written); any other line that is not JSON is a one-line error."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise GptzooError(f"{run_dir} holds no {METRICS_FILE}; pass a run directory made by "
                          "gptzoo train")
    return _read(path)


def _read(path: Path) -> list[dict[str, Any]]:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:  # only the last line can be cut short by a kill
                raise GptzooError(f"{path} line {i + 1} is not JSON; delete that line or the "
                                  "file") from None
    return records
