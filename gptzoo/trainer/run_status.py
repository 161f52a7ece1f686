"""`RUN_DIR/status.json`: whether a run is running, finished, interrupted or failed, and the run's
clock. `gptzoo runs` reads it; a "running" run whose process is gone reads as failed (killed).

The file is replaced atomically (write a temporary file, then rename), so a reader, or a run
killed mid-write, never sees half of it.
"""

import json
import os
import socket
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gptzoo.atomic import write_text_atomic
from gptzoo.errors import GptzooError
from gptzoo.processes import alive
from gptzoo.trainer.metrics_file import read_records

STATUS_FILE = "status.json"


class RunStatus:
    """Written at the start of a run (`begin`) and at its end (`end`), and on the way out of an
    exception inside `recording()`. `wall_time()` counts seconds since the run began, continuing
    from the last record's `wall_time` when it resumes. With `write=False` (the other processes
    of a multi-host run) it keeps the clock and writes nothing."""

    def __init__(self, run_dir: Path, fields: dict[str, Any], wall_time_before: float,
                 write: bool = True):
        self.path = run_dir / STATUS_FILE
        self.fields, self.write = fields, write
        self.started = time.perf_counter()
        self.wall_time_before = wall_time_before

    @classmethod
    def begin(cls, run_dir: Path, resume: bool, parameters: int,
              write: bool = True) -> "RunStatus":
        previous = [r["wall_time"] for r in read_records(run_dir) if "wall_time" in r] \
            if resume and write else []
        status = cls(run_dir, {"parameters": parameters}, previous[-1] if previous else 0.0,
                     write)
        status.update("running", pid=os.getpid(), host=socket.gethostname(),
                      started=datetime.now(UTC).isoformat(timespec="seconds"))
        return status

    def wall_time(self) -> float:
        return self.wall_time_before + time.perf_counter() - self.started

    def update(self, state: str, **fields: Any) -> None:
        self.fields.update(fields, status=state, wall_time=round(self.wall_time(), 3))
        if self.write:
            write_text_atomic(self.path, json.dumps(self.fields, indent=2) + "\n")

    def end(self, state: str, **fields: Any) -> None:
        self.update(state, ended=datetime.now(UTC).isoformat(timespec="seconds"), **fields)

    @contextmanager
    def recording(self):
        """Record a second Ctrl-C as "interrupted" and any other exception as "failed" with its
        first line, then let it propagate."""
        try:
            yield self
        except KeyboardInterrupt:
            self.end("interrupted")
            raise
        except Exception as e:
            line = str(e).splitlines()[0] if str(e) else ""
            # The line the CLI prints: gptzoo's own errors speak for themselves.
            self.end("failed", error=line if isinstance(e, GptzooError) else
                     f"{type(e).__name__}: {line}")
            raise


def read_status(run_dir: Path) -> dict[str, Any]:
    """The run's status, "unknown" for runs made before status.json; a "running" run whose
    process has died on this host reads as failed."""
    path = run_dir / STATUS_FILE
    if not path.is_file():
        return {"status": "unknown"}
    status = json.loads(path.read_text())
    if (status["status"] == "running" and status.get("host") == socket.gethostname()
            and not alive(status["pid"])):
        status.update(status="failed", error="killed: its process is gone")
    return status
