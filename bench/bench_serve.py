"""`gptzoo serve` under load: aggregate tokens/s with 1, 4, 8 and 16 concurrent streaming
clients, time to first token (median and 95th percentile) and per-token latency, on the 4 x 128
char model (nanoGPT's CPU shape: 4 layers, 4 heads, 128 wide, block size 64).

    python bench/bench_serve.py [--quick] [--run RUN_DIR]

It trains the model for a few steps into a temporary run (tokens/s do not depend on the weights)
unless `--run` names one, starts `gptzoo serve` on a free 127.0.0.1 port with 16 slots, and
sends each client's requests one after another: a short prompt, `--tokens` new tokens, streamed.
Every figure is printed, none asserted; issue 30's goals are printed beside them.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"model.n_layers": "4", "model.n_heads": "4", "model.d_model": "128",
         "model.block_size": "64", "trainer.max_steps": "10", "trainer.eval_interval": "10",
         "trainer.checkpoint_interval": "10"}
CLIENTS = (1, 4, 8, 16)
SLOTS = 16
REQUEST_TIMEOUT_S = 300
STARTUP_S = 600


def train_run(folder: Path) -> Path:
    run = folder / "char_4x128"
    overrides = [arg for key, value in SHAPE.items() for arg in ("--set", f"{key}={value}")]
    subprocess.run([sys.executable, "-m", "gptzoo", "train", "recipes/char_shakespeare.py",
                    *overrides, "--run-dir", str(run)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return run


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(run: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "gptzoo", "serve", "--ckpt", str(run),
                                   "--port", str(port), "--slots", str(SLOTS)],
                                  cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit(f"gptzoo serve did not start:\n{log.read_text()}")


async def one_request(client: httpx.AsyncClient, url: str, seed: int, n_tokens: int) -> dict:
    """One streamed completion: seconds to its first token, seconds per later token, tokens."""
    body = {"prompt": "ROMEO:", "max_tokens": n_tokens, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    sent, first, last, tokens = time.perf_counter(), None, None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
    return {"ttft": first - sent, "per_token": (last - first) / max(tokens - 1, 1),
            "tokens": tokens}


async def round_of(url: str, n_clients: int, requests_each: int, n_tokens: int) -> dict:
    """`n_clients` clients at once, each sending `requests_each` requests in turn."""
    limits = httpx.Limits(max_connections=n_clients)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        async def client_loop(index: int) -> list[dict]:
            return [await one_request(client, url, index * requests_each + i, n_tokens)
                    for i in range(requests_each)]
        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*map(client_loop, range(n_clients)))
                   for r in rs]
        wall = time.perf_counter() - start
    ttfts = sorted(r["ttft"] for r in results)
    return {"tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_median": statistics.median(ttfts),
            "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
            "per_token": statistics.median(r["per_token"] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer requests and tokens.")
    parser.add_argument("--run", type=Path, help="Serve this run instead of training one.")
    parser.add_argument("--tokens", type=int, default=None, help="New tokens per request.")
    args, _ = parser.parse_known_args()  # nox -s bench passes every script the same options
    n_tokens = args.tokens or (32 if args.quick else 256)
    requests_each = 2 if args.quick else 4
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
        run = args.run or train_run(Path(folder))
        server, url = start_server(run, Path(folder) / "serve.log")
        try:
            asyncio.run(round_of(url, SLOTS, 1, 8))  # first requests: nothing to compile left
            rows = {n: asyncio.run(round_of(url, n, requests_each, n_tokens)) for n in CLIENTS}
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(f"gptzoo serve, {run.name}, {SLOTS} slots, {n_tokens} tokens per request, "
          f"{requests_each} requests per client ({os.cpu_count()} CPUs)")
    print(f"{'clients':>7} {'tokens/s':>9} {'x 1 client':>10} {'TTFT median':>12} "
          f"{'TTFT p95':>9} {'ms/token':>9}")
    for n, row in rows.items():
        print(f"{n:>7} {row['tokens_per_s']:>9,.0f} "
              f"{row['tokens_per_s'] / rows[1]['tokens_per_s']:>10.2f} "
              f"{1e3 * row['ttft_median']:>9.1f} ms {1e3 * row['ttft_p95']:>6.1f} ms "
              f"{1e3 * row['per_token']:>9.2f}")
    print("goals (issue 30): 8 clients >= 4x one client's tokens/s; first token of a short "
          "prompt on a warm server (1 client) <= 50 ms")


if __name__ == "__main__":
    main()
