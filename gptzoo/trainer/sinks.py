"""Where a run's metrics records go: `metrics.jsonl` always, TensorBoard event files in the run
directory always, Weights & Biases when `trainer.wandb=true`.

A record is the dict the loop logs every `trainer.log_interval` steps (`step`, `train_loss`, `lr`,
`tokens_per_sec`, `wall_time`, and `val_loss` at evaluation steps; other branches add keys). A sink
is anything with `write(record)` and `close()`; `open_sinks` builds the run's fan-out.
"""

import os
import secrets
import socket
import urllib.parse
from pathlib import Path
from typing import Any, Protocol

from gptzoo.errors import GptzooError
from gptzoo.recipe import Recipe
from gptzoo.trainer.metrics_file import MetricsLog
from gptzoo.workarounds import torch_hidden

# Record keys to TensorBoard tags: the prefix groups them into sections; any other numeric key
# is logged under its own name.
TAGS = {
    "train_loss": "loss/train", "val_loss": "loss/val", "val_bpb": "loss/val_bits_per_byte",
    "aux_loss": "loss/aux",
    "lr": "optim/lr", "grad_norm": "optim/grad_norm", "bad_steps": "optim/bad_steps",
    "tokens_per_sec": "speed/tokens_per_sec", "wall_time": "speed/wall_time",
}


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numeric values but `step` (a `None` means "not measured" and is skipped)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


class Sinks:
    """Hands every record to each sink in turn."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class JsonlSink:
    """The run's `metrics.jsonl`, through `MetricsLog`."""

    def __init__(self, log: MetricsLog):
        self.log = log

    def write(self, record: dict[str, Any]) -> None:
        self.log.write(record)

    def close(self) -> None:
        pass


class TensorBoardSink:
    """Event files in the run directory. tensorboardX's own thread writes each record to disk
    within `FLUSH_SECONDS`, so `tensorboard --logdir runs` follows the run live without the loop
    waiting for the disk (a flush at every record would idle the devices at each log step). A
    killed run's events lack at most that last second; metrics.jsonl has them."""

    FLUSH_SECONDS = 1

    def __init__(self, run_dir: Path, resume_step: int | None):
        SummaryWriter = _summary_writer_class()
        # A resumed run re-logs the steps past its checkpoint: purge_step tells TensorBoard to drop
        # the older events from that step on, as MetricsLog drops those records.
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(run_dir), purge_step=purge, flush_secs=self.FLUSH_SECONDS)

    def write(self, record: dict[str, Any]) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(TAGS.get(key, key), value, record["step"])

    def close(self) -> None:
        self.writer.close()


def _summary_writer_class():
    """tensorboardX's writer, loaded without torch (`workarounds.torch_hidden`)."""
    with torch_hidden():
        from tensorboardX import SummaryWriter
    return SummaryWriter


class WandbSink:
    """A Weights & Biases run named after the run directory, in project `trainer.wandb_project`,
    with the resolved recipe as its config. Offline (files under `RUN_DIR/wandb/`, uploaded later
    with `wandb sync`) unless an API key is set and the server answers; `WANDB_MODE` overrides."""

    def __init__(self, recipe: Recipe, run_dir: Path, resume_step: int | None):
        try:
            import wandb
        except ImportError as e:
            raise GptzooError("trainer.wandb=true needs the wandb package: pip install -e .[wandb] "
                              "(or pip install wandb), or drop trainer.wandb") from e
        # The id lives in the run directory so --resume continues the same W&B run.
        id_file = run_dir / "wandb" / "run_id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None or not id_file.is_file():
            id_file.write_text(secrets.token_hex(4))
        self.run = wandb.init(
            project=recipe.trainer.wandb_project, name=run_dir.name, group=recipe.name,
            id=id_file.read_text().strip(), resume="allow", dir=str(run_dir),
            config={"name": recipe.name, **recipe.to_dict()}, mode=wandb_mode(),
        )

    def write(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def wandb_mode() -> str:
    """`WANDB_MODE` if set; else online only with credentials and a reachable server, so a run
    without network never waits on W&B's timeouts."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if not _wandb_credentials():
        return "offline"
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        socket.create_connection((host.hostname, host.port or 443), timeout=3).close()
    except OSError:
        return "offline"
    return "online"


def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc  # `wandb login` stores the key in ~/.netrc

    try:
        return any("wandb" in host for host in netrc.netrc().hosts)
    except (OSError, netrc.NetrcParseError):
        return False


def open_sinks(recipe: Recipe, run_dir: Path, metrics: MetricsLog,
               resume_step: int | None) -> Sinks:
    """The run's sinks; `resume_step` is the checkpoint a resumed run continues from."""
    # W&B first: a missing package fails before any file is written.
    sinks: list[Sink] = [WandbSink(recipe, run_dir, resume_step)] if recipe.trainer.wandb else []
    return Sinks([JsonlSink(metrics), TensorBoardSink(run_dir, resume_step), *sinks])
