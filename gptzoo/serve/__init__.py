"""`gptzoo serve`: an OpenAI-compatible HTTP server over a run's model.

`app` holds the routes, `schemas` the request bodies, `answer` the response objects and streams,
`engine` the device thread and its decode slots, `programs` the compiled prefill and decode,
`job` one choice's text, `chat` the chat templates, `metrics` the Prometheus metrics.
"""

import socket
from collections.abc import Callable
from pathlib import Path

from gptzoo.errors import GptzooError


def serve(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, slots: int = 8,
          max_queue: int = 64, api_key: str | None = None, chat_template: str | None = None,
          log: Callable[[str], None] = print) -> None:
    """Load a run's newest checkpoint and serve it until interrupted (Ctrl-C)."""
    import uvicorn

    from gptzoo.models.protocol import CachedDecoder, can_decode, require
    from gptzoo.serve.app import Server, create_app
    from gptzoo.serve.chat import ChatTemplate
    from gptzoo.serve.engine import Engine
    from gptzoo.serve.metrics import ServerMetrics
    from gptzoo.trainer import load

    if slots < 1:
        raise GptzooError(f"--slots={slots} must be at least 1")
    if max_queue < 0:
        raise GptzooError(f"--max-queue={max_queue} is negative; pass 0 or more")
    if not 1 <= port <= 65535:
        raise GptzooError(f"--port={port} is not a TCP port; pass one from 1 to 65535")
    _check_port_free(host, port)
    template = ChatTemplate.for_run(run_dir, chat_template)
    model, tokenizer = load(run_dir)
    require(model, CachedDecoder, "gptzoo serve", "serve a model built with gptzoo.models.decoder")
    if not can_decode(model):
        raise GptzooError(f"{run_dir}'s model has no KV cache (a part mixes positions outside "
                          "attention), which gptzoo serve decodes with; use gptzoo sample "
                          "--no-cache for it")
    metrics = ServerMetrics()
    engine = Engine(model, slots, max_queue, metrics)
    name = Path(run_dir).resolve().name
    app = create_app(Server(engine, tokenizer, name, template, metrics, api_key), log)
    log(f"serving {run_dir} as {name!r} at http://{host}:{port}/v1 with {slots} slots; "
        "GET /health answers 200 once its programs are compiled")
    # Open streams would hold a Ctrl-C until they end: they get a few seconds.
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise GptzooError(f"cannot listen on {host}:{port} ({e.strerror}); pass another "
                              "--port or --host") from e
