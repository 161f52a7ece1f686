"""`gptzoo runs`: a table of the runs under a folder, from the files each run directory holds."""

import json
import statistics
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from gptzoo.errors import GptzooError
from gptzoo.trainer.checkpoint import BEST
from gptzoo.trainer.metrics_file import read_records
from gptzoo.trainer.run_status import read_status

COLUMNS = ("run", "recipe", "parameters", "steps", "best val", "last val", "tokens/s",
           "wall time", "status")
STATUS_STYLES = {"finished": "green", "running": "cyan", "interrupted": "yellow", "failed": "red"}


def find_runs(root: Path) -> list[Path]:
    """Every run directory (one holding recipe.json) at or below `root`, by path, but a run's
    `best/` (`trainer.keep_best`): its run's row shows the best val loss."""
    if not root.is_dir():
        raise GptzooError(f"{root} is not a folder; pass the folder holding your runs "
                          "(default runs/)")
    runs = {p.parent for p in root.rglob("recipe.json")}
    return sorted(run for run in runs if not (run.name == BEST and run.parent in runs))


def summarize(run_dir: Path) -> dict[str, Any]:
    """One run's row: the values behind each column (None where the run has none yet)."""
    recipe = json.loads((run_dir / "recipe.json").read_text())
    status = read_status(run_dir)
    records = read_records(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    val = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    speeds = [r["tokens_per_sec"] for r in records if r.get("tokens_per_sec")]
    return {
        "recipe": recipe.get("name"), "parameters": status.get("parameters"),
        "step": records[-1]["step"] if records else 0,
        "max_steps": recipe["trainer"]["max_steps"],
        "best_val": min(val, default=None), "last_val": val[-1] if val else None,
        "tokens_per_sec": statistics.median(speeds) if speeds else None,
        "wall_time": records[-1].get("wall_time") if records else None,
        "status": status["status"], "error": status.get("error"),
    }


def runs_table(root: Path) -> Table:
    table = Table(title=f"runs under {root}")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("run", "recipe", "status")
                         else "right")
    for run_dir in find_runs(root):
        s = summarize(run_dir)
        state = s["status"] + (f": {s['error']}" if s["error"] else "")
        table.add_row(
            str(run_dir.relative_to(root)) if run_dir != root else run_dir.name,
            s["recipe"], _maybe(s["parameters"], "{:,}"), f"{s['step']:,} / {s['max_steps']:,}",
            _maybe(s["best_val"], "{:.4f}"), _maybe(s["last_val"], "{:.4f}"),
            _maybe(s["tokens_per_sec"], "{:,.0f}"), _duration(s["wall_time"]),
            f"[{STATUS_STYLES.get(s['status'], 'dim')}]{escape(state)}[/]",
        )
    return table


def _maybe(value: Any, form: str) -> str:
    return "-" if value is None else form.format(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
