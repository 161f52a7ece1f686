"""A `gptzoo serve` process on a free 127.0.0.1 port, for the serving tests."""

import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from conftest import ROOT
from prometheus_client.parser import text_string_to_metric_families

STARTUP_S = 300  # generous: the machine may be busy compiling other tests' programs


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    log: Path
    warm_compilations: float = 0.0

    def output(self) -> str:
        return self.log.read_text()


@contextlib.contextmanager
def live_server(run_dir: Path, log: Path, *args: str):
    """`gptzoo serve --ckpt run_dir ARGS` until the block ends, once `/health` answers 200."""
    port = free_port()
    command = [sys.executable, "-m", "gptzoo", "serve", "--ckpt", str(run_dir),
               "--port", str(port), *args]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
    server = LiveServer(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + STARTUP_S
        while not _healthy(server.url):
            assert process.poll() is None, f"gptzoo serve exited:\n{server.output()}"
            assert time.monotonic() < deadline, f"not ready in {STARTUP_S} s:\n{server.output()}"
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


SLOTS, QUEUE, KEY = 4, 4, "test-key"  # the test server's settings


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory) -> LiveServer:
    """A server over the shared tiny run for a test module (which takes this fixture with
    `server = live_server.server`): 4 slots, a queue of 4, an API key; `warm_compilations` is its
    compilation count once ready."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with live_server(trained_run, log, "--slots", str(SLOTS), "--max-queue", str(QUEUE),
                     "--api-key", KEY) as live:
        live.warm_compilations = compilations(live)
        yield live


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    """The official client, without its retries (a 429 must reach the test)."""
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def metric(server: LiveServer, name: str) -> float:
    """A metric's value from `/metrics`, read with prometheus_client's own parser."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise KeyError(name)


def compilations(server: LiveServer) -> float:
    return metric(server, "gptzoo_compilations_total")
