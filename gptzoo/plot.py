"""Training curves of one or more runs on one figure, from their `metrics.jsonl`."""

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
from matplotlib.figure import Figure  # noqa: E402

from gptzoo.trainer.metrics_file import read_records  # noqa: E402

# (title, x key, y keys, y label): train loss solid, validation loss dashed.
PANELS = [
    ("Loss against step", "step", ("train_loss", "val_loss"), "loss (nats per token)"),
    ("Loss against wall-clock time", "wall_time", ("train_loss", "val_loss"),
     "loss (nats per token)"),
    ("Learning rate", "step", ("lr",), "learning rate"),
    ("Throughput", "step", ("tokens_per_sec",), "tokens / s"),
]
STYLES = {"train_loss": dict(linestyle="-", linewidth=1.2, alpha=0.8),
          "val_loss": dict(linestyle="--", marker="o", markersize=3, linewidth=1.6)}
LABELS = {"train_loss": "train", "val_loss": "val"}


def run_names(run_dirs: list[Path]) -> list[str]:
    """Each run's folder name, or its path where two runs share a name."""
    names = [d.name for d in run_dirs]
    return [str(d) if names.count(d.name) > 1 else d.name for d in run_dirs]


def plot_runs(run_dirs: list[str | Path]) -> Figure:
    """A 2x2 figure: loss against step and against wall time, learning rate and tokens/s; one
    colour per run, train solid and validation dashed."""
    run_dirs = [Path(d) for d in run_dirs]
    runs = [read_records(d) for d in run_dirs]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), facecolor="white", layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    minutes = max((r.get("wall_time", 0) for rs in runs for r in rs), default=0) > 600
    for ax, (title, x_key, y_keys, y_label) in zip(axes.flat, PANELS, strict=True):
        for i, (name, records) in enumerate(zip(run_names(run_dirs), runs, strict=True)):
            for key in y_keys:
                xs, ys = _series(records, x_key, key)
                if x_key == "wall_time" and minutes:
                    xs = [x / 60 for x in xs]
                label = f"{name} {LABELS[key]}" if key in LABELS else name
                ax.plot(xs, ys, color=colors[i % len(colors)], label=label,
                        **STYLES.get(key, dict(linewidth=1.4)))
        ax.set_title(title)
        ax.set_xlabel({"step": "step", "wall_time": "wall-clock time"}[x_key]
                      + (" (min)" if minutes else " (s)") * (x_key == "wall_time"))
        ax.set_ylabel(y_label)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    axes[1][0].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[1][1].yaxis.set_major_formatter("{x:,.0f}")
    return fig


def _series(records: list[dict[str, Any]], x_key: str, y_key: str) -> tuple[list, list]:
    points = [(r[x_key], r[y_key]) for r in records
              if r.get(x_key) is not None and r.get(y_key) is not None]
    return [x for x, _ in points], [y for _, y in points]


def save_plot(run_dirs: list[str | Path], out: str | Path) -> Figure:
    fig = plot_runs(run_dirs)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return fig
