"""The HTTP side: FastAPI routes that validate a request, turn it into jobs for the engine and
answer with OpenAI's objects. Handlers run on the event loop and never touch the device."""

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gptzoo.data import Tokenizer
from gptzoo.errors import GptzooError
from gptzoo.serve.answer import Answer, ChatAnswer, CompletionAnswer
from gptzoo.serve.chat import ChatTemplate
from gptzoo.serve.engine import Engine, QueueFull
from gptzoo.serve.errors import ApiError, error_response, install_error_handlers
from gptzoo.serve.job import Job, Sampling
from gptzoo.serve.metrics import ServerMetrics
from gptzoo.serve.schemas import (
    INT32,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    Sampled,
    TokenizeRequest,
)


async def _announce(engine: Engine, log: Callable[[str], None] | None) -> None:
    started = time.perf_counter()
    while not (engine.ready.is_set() or engine.failure):
        await asyncio.sleep(0.05)
    if log is not None:
        forms = ", ".join(f"{width} {form}" for width, form in engine.chosen.items())
        forms = forms and f"; weight layout by rows decoded: {forms}"
        log(f"error: compiling failed ({engine.failure})" if engine.failure else
            f"ready: programs compiled in {time.perf_counter() - started:.1f} s{forms}")


class EventStream(StreamingResponse):
    """A `text/event-stream` response that calls `on_close` however it ends (finished, or its
    client gone), so an abandoned answer's jobs leave their slots."""

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class Server:
    """What the routes share: the engine, the tokenizer, the chat template and the settings.

    **Arguments:**

    - `engine`: the running `Engine`.
    - `tokenizer`: the model's tokenizer.
    - `model_name`: the name `/v1/models` lists and requests may give as `model`.
    - `chat_template`: renders chat messages.
    - `metrics`: the `ServerMetrics` that `/metrics` shows.
    - `api_key`: the key every request but `/health` and `/metrics` must send as
        `Authorization: Bearer KEY`, or None.
    """

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str,
                 chat_template: ChatTemplate, metrics: ServerMetrics, api_key: str | None = None):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.chat_template, self.metrics, self.api_key = chat_template, metrics, api_key

    def check(self, body: Sampled) -> None:
        if self.engine.failure:
            raise ApiError(503, f"the server could not compile its programs "
                                f"({self.engine.failure})")
        if not self.engine.ready.is_set():
            raise ApiError(503, "the server is still compiling its programs; retry when "
                                "GET /health answers 200")
        self.check_model(body.model)
        body.check(self.engine.n_slots)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"model {model!r} is not served here; this server serves "
                                f"{self.model_name!r} (GET /v1/models)", "model",
                           "model_not_found")

    def tokenize(self, text: str, field: str) -> list[int]:
        """A text's token ids; an empty text gives the tokenizer's start tokens, from which
        `gptzoo sample` starts an empty prompt."""
        try:
            tokens = self.tokenizer.encode(text) if text else self.tokenizer.start_tokens()
        except GptzooError as e:
            raise ApiError(400, f"{field}: {e}", field) from e
        return [int(t) for t in tokens]

    def check_ids(self, tokens: list[int], field: str) -> list[int]:
        if tokens and max(tokens) >= self.engine.vocab:
            raise ApiError(400, f"{field}: token id {max(tokens)} is outside the vocabulary of "
                                f"{self.engine.vocab}", field)
        return tokens

    def encode(self, prompt: str | list[int], field: str) -> list[int]:
        """A prompt's token ids: at least one, each in the vocabulary, at most the window."""
        tokens = (self.tokenize(prompt, field) if isinstance(prompt, str)
                  else self.check_ids(prompt, field))
        window = self.engine.block_size
        if len(tokens) > window:
            raise ApiError(400, f"{field} is {len(tokens)} tokens, more than this model's window "
                                f"of {window}; shorten it", field)
        return tokens

    def jobs(self, answer: Answer, body: Sampled, prompts: list[list[int]], max_tokens: int,
             echo: bool = False) -> list[Job]:
        """`body.n` jobs per prompt; choice j of a prompt has seed `seed + j` (a random seed when
        the request gives none), as `gptzoo sample --num-samples` does."""
        seed = random.randrange(INT32 - body.n) if body.seed is None else body.seed
        return [Job(i * body.n + j, np.asarray(prompt, np.int32), max_tokens,
                    Sampling(body.temperature, body.top_k, body.top_p, seed + j), body.stops(),
                    echo, answer.n_top is not None, self.tokenizer, answer.post)
                for i, prompt in enumerate(prompts) for j in range(body.n)]

    async def respond(self, answer: Answer, body: Sampled, request: Request) -> Response:
        try:
            self.engine.submit(answer.jobs)
        except QueueFull:
            raise ApiError(429, "the server's queue is full; retry later",
                           code="queue_full") from None
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return EventStream(answer.stream(include_usage), answer.cancel)
        return JSONResponse(await answer.whole(request))


class RequireKey:
    """Refuses with a 401 every request but `/health` and `/metrics` that does not send
    `Authorization: Bearer KEY`. A plain ASGI middleware: through `@app.middleware`'s
    `BaseHTTPMiddleware` a handler never sees its client disconnect (starlette discussion
    #2094), and a whole answer's jobs would run on for nobody.

    **Arguments:**

    - `app`: the application it guards.
    - `key`: the key.
    """

    OPEN = ("/health", "/metrics")

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                refusal = error_response(401, "missing or wrong API key; send the server's "
                                              "--api-key as 'Authorization: Bearer KEY'",
                                         code="invalid_api_key")
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(server: Server, log: Callable[[str], None] | None = None) -> FastAPI:
    """The FastAPI application; it starts the engine (warm-up first) and stops it with the
    app, and `log`s when the engine is ready."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine.start()
        announce = asyncio.create_task(_announce(server.engine, log))
        yield
        announce.cancel()
        server.engine.stop()

    app = FastAPI(title="gptzoo", lifespan=lifespan)
    install_error_handlers(app)

    if server.api_key is not None:
        app.add_middleware(RequireKey, key=server.api_key)
    _add_info_routes(app, server)
    _add_generation_routes(app, server)
    return app


def _add_info_routes(app: FastAPI, server: Server) -> None:
    """Health, metrics, the model list and vLLM's tokenizer endpoints."""
    @app.get("/health")
    async def health():
        if server.engine.ready.is_set():
            return {"status": "ok"}
        if server.engine.failure:
            return JSONResponse({"status": "failed", "error": server.engine.failure}, 500)
        return JSONResponse({"status": "warming up"}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.text(), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": server.model_name, "object": "model", "created": 0, "owned_by": "gptzoo",
                "max_model_len": server.engine.block_size}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}")
    async def model(model: str):
        server.check_model(model)
        return model_card()

    # vLLM's tokenizer endpoints, through which lm-eval's local-completions tokenizes
    # (its "remote" tokenizer backend).
    @app.get("/tokenizer_info")
    async def tokenizer_info():
        end = server.tokenizer.end_of_text
        return {"eos_token": None if end is None else server.tokenizer.decode([end]),
                "bos_token": None, "pad_token": None,
                "model_max_length": server.engine.block_size}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        server.check_model(body.model)
        tokens = server.tokenize(body.prompt, "prompt")
        return {"tokens": tokens, "count": len(tokens),
                "max_model_len": server.engine.block_size}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        server.check_model(body.model)
        return {"prompt": server.tokenizer.decode(server.check_ids(body.tokens, "tokens"))}


def _add_generation_routes(app: FastAPI, server: Server) -> None:
    """The completion and chat completion endpoints."""
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        server.check(body)
        given = body.prompts()
        prompts = [server.encode(p, "prompt") for p in given]
        echoed = [[] if text == "" else p for text, p in zip(given, prompts, strict=True)]
        answer = CompletionAnswer(server.model_name, server.tokenizer, len(prompts) * body.n,
                                  sum(map(len, prompts)), body.logprobs,
                                  prompts=[p for p in echoed for _ in range(body.n)],
                                  echo=body.echo)
        answer.jobs = server.jobs(answer, body, prompts, body.max_tokens,
                                  echo=body.echo and body.logprobs is not None)
        return await server.respond(answer, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        server.check(body)
        text = server.chat_template.render([m.as_dict() for m in body.messages])
        prompt = server.encode(text, "messages")
        n_top = (body.top_logprobs or 0) if body.logprobs else None
        answer = ChatAnswer(server.model_name, server.tokenizer, body.n, len(prompt), n_top)
        answer.jobs = server.jobs(answer, body, [prompt],
                                  body.token_limit(server.engine.block_size))
        return await server.respond(answer, body, request)
