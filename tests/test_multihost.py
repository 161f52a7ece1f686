"""Multi-host training on one machine: CPU processes joined through `jax.distributed` (a coordinator
on 127.0.0.1, gloo collectives) train like one process with the same global batch, each reading
only its own rows; a Ctrl-C on one of them stops all; their checkpoint resumes in one process.

The multi-process tests run in `nox -s dist`; the argument checks run with the rest."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import RECIPE, ROOT, TINY, gptzoo_cli, set_args

from gptzoo.errors import GptzooError
from gptzoo.trainer import distributed
from gptzoo.trainer.metrics_file import read_records

# Ten steps, a checkpoint at step 5 to resume from, a record at every step.
TEN = {**TINY, "trainer.max_steps": "10", "trainer.checkpoint_interval": "5",
       "trainer.log_interval": "1", "trainer.eval_interval": "10"}
DEADLOCK_S = 600  # far beyond a healthy run, even on a 2-core machine shared by other jobs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(*command: str, n: int = 2) -> list[subprocess.Popen]:
    """`python -c COMMAND...` once per process, with the coordinator flags the CLI takes appended
    (the tests' loader script reads the same flags)."""
    coordinator = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return [subprocess.Popen([sys.executable, "-c", *map(str, command), "--coordinator",
                              coordinator, "--num-processes", str(n), "--process-id", str(i)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             cwd=ROOT)
            for i in range(n)]


def finish(processes: list[subprocess.Popen], timeout: float = DEADLOCK_S
           ) -> list[tuple[int, str, str]]:
    """Each process's (exit status, stdout, stderr); all are killed and the test fails if any is
    still running after `timeout` seconds (a deadlock)."""
    deadline, results = time.monotonic() + timeout, []
    try:
        for p in processes:
            out, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in processes:
            p.kill()
        pytest.fail(f"the processes were still running after {timeout}s: a deadlock")
    return results


def train_together(*args) -> list[tuple[int, str, str]]:
    return finish(start_processes("from gptzoo.cli import main; main()", "train", *args))


def losses(run_dir: Path, key: str = "train_loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_records(run_dir) if key in r}


@pytest.mark.dist
def test_two_processes_train_like_one_and_resume_in_one(tmp_path, small_text):
    args = [RECIPE, *set_args({**TEN, "data.path": str(small_text)})]
    two, one, resumed = tmp_path / "two", tmp_path / "one", tmp_path / "resumed"
    results = train_together(*args, "--run-dir", two)
    assert [rc for rc, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    assert "final val loss" in results[0][1]
    assert "training" not in results[1][1] and "loss" not in results[1][1]  # process 0 reports
    # Process 0 alone wrote the records: one per step, none twice.
    assert [r["step"] for r in read_records(two)] == list(range(1, 11))
    assert json.loads((two / "status.json").read_text())["status"] == "finished"
    gptzoo_cli("train", *args, "--run-dir", one, check=True)
    # Same global batch, rows split over the processes: float32 reduction order apart, equal.
    for key in ("train_loss", "val_loss"):
        assert losses(two, key).keys() == losses(one, key).keys()
        np.testing.assert_allclose(list(losses(two, key).values()),
                                   list(losses(one, key).values()), rtol=1e-5)

    # The processes' step-5 checkpoint, resumed in one process, repeats their steps 6 to 10.
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "10")
    gptzoo_cli("train", *args, "--run-dir", resumed, "--resume", check=True)
    after5 = {s: v for s, v in losses(two).items() if s > 5}
    assert [s for s in losses(resumed) if s > 5] == list(after5)
    np.testing.assert_allclose([losses(resumed)[s] for s in after5], list(after5.values()),
                               rtol=1e-5)


@pytest.mark.dist
def test_ctrl_c_on_one_process_stops_and_saves_both(tmp_path, small_text):
    run_dir = tmp_path / "run"
    long = {**TINY, "data.path": str(small_text), "trainer.max_steps": "5000",
            "trainer.log_interval": "5", "trainer.eval_interval": "5000",
            "trainer.checkpoint_interval": "5000"}
    processes = start_processes("from gptzoo.cli import main; main()", "train", RECIPE,
                                *set_args(long), "--run-dir", run_dir)
    deadline = time.monotonic() + DEADLOCK_S
    while not ((run_dir / "metrics.jsonl").is_file() and read_records(run_dir)):
        if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
            finish(processes, timeout=1)
            pytest.fail("the run ended or stalled before its first record")
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGINT)  # process 1 alone: it writes nothing and shows nothing
    results = finish(processes)

    assert [rc for rc, _, _ in results] == [130, 130], [err[-2000:] for _, _, err in results]
    stopped = read_records(run_dir)[-1]["step"]
    assert stopped < 5000
    saved = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(saved) == stopped
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"
    assert f"interrupted: saved step {stopped}" in results[0][1]


# Run by two processes of two CPU devices each: which windows each one reads for the chunk of
# steps 3 and 4, and whether its shards of the global array hold the right rows.
LOADER = """
import json, sys
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

jax.config.update("jax_num_cpu_devices", 2)
from gptzoo.data import Batches
from gptzoo.trainer.distributed import join_cluster

join_cluster(sys.argv[2], int(sys.argv[4]), int(sys.argv[6]))


class Recorded:
    def __init__(self, n):
        self.tokens, self.read = np.arange(n, dtype=np.int32), []

    def __len__(self):
        return len(self.tokens)

    def require(self, n_tokens, what):
        pass

    def windows(self, starts, length):
        self.read += starts.tolist()
        return np.stack([self.tokens[s:s + length] for s in starts])


devices = np.array(jax.devices()).reshape(2, 2)  # a process's devices along a row
layouts = {"rows over data x fsdp": NamedSharding(Mesh(devices, ("data", "fsdp")),
                                                  P(None, ("data", "fsdp"))),
           "each process on both data shards": NamedSharding(Mesh(devices.T, ("data", "tensor")),
                                                             P(None, "data"))}
split = Recorded(5000)
batches = Batches(split, batch_size=8, block_size=16, seed=0)
report = {}
for name, sharding in layouts.items():
    split.read.clear()
    chunk = batches.on_devices(3, 2, sharding)
    read = sorted(split.read)
    expected = batches.chunk(3, 2)
    assert chunk.shape == expected.shape
    assert all((np.asarray(s.data) == expected[s.index]).all() for s in chunk.addressable_shards)
    report[name] = read
for name, rows in (("rows 0-3", range(0, 4)), ("rows 4-7", range(4, 8)), ("all", None)):
    report[name] = sorted(batches.starts(3, 2, rows).tolist())
print(json.dumps(report))
"""


@pytest.mark.dist
def test_each_process_reads_only_the_rows_its_devices_hold():
    results = finish(start_processes(LOADER))
    assert [rc for rc, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    first, second = (json.loads(out.splitlines()[-1]) for _, out, _ in results)
    # The batch split four ways over (data, fsdp): each process reads its half, no more.
    assert first["rows over data x fsdp"] == first["rows 0-3"]
    assert second["rows over data x fsdp"] == first["rows 4-7"]
    # Each process holds a device on both data shards: each reads the whole batch.
    assert first["each process on both data shards"] == first["all"]
    assert second["each process on both data shards"] == first["all"]


def test_coordinator_flags_go_together():
    result = gptzoo_cli("train", RECIPE, "--coordinator", "127.0.0.1:1234")
    assert result.returncode == 1
    assert result.stderr.startswith("error: --num-processes, --process-id missing")
    assert len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(GptzooError, match="is not HOST:PORT"):
        distributed.join_cluster("1234", 2, 0)
    with pytest.raises(GptzooError, match="--process-id 2 is not in 0..1"):
        distributed.join_cluster("127.0.0.1:1234", 2, 2)


CLUSTER_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                     "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST")


@pytest.mark.parametrize("tasks, joins", [(None, False), ("1", False), ("2", True)])
def test_joins_a_cluster_jax_detects_only_with_several_processes(monkeypatch, tasks, joins):
    for name in CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    if tasks:  # what srun sets for each task
        for name, value in (("SLURM_JOB_ID", "7"), ("SLURM_STEP_NODELIST", "node[001-002]"),
                            ("SLURM_NTASKS", tasks), ("SLURM_PROCID", "0"),
                            ("SLURM_LOCALID", "0")):
            monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    assert (distributed.detected_cluster() is not None) == (tasks is not None)
    distributed.join_cluster()
    assert calls == ([((), {})] if joins else [])
