"""A request's choices as they arrive from the engine, turned into OpenAI's objects: a whole
`text_completion` or `chat.completion`, or a stream of chunks (`data: {chunk}` lines of a
`text/event-stream`, `data: [DONE]` last)."""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request

from gptzoo.data import Tokenizer
from gptzoo.data.token_bytes import token_string
from gptzoo.sample import TextStream
from gptzoo.serve.errors import ApiError
from gptzoo.serve.job import Event, Job

DONE = "data: [DONE]\n\n"
DISCONNECT_POLL_S = 0.5  # how often a whole answer's wait checks that its client is still there


def sse(chunk: dict) -> str:
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


class Answer:
    """The events of one request's jobs, gathered on the event loop.

    **Arguments:**

    - `model`: the model's name, as answers carry it.
    - `tokenizer`: turns token ids into the token strings of log-probabilities.
    - `n_choices`: how many jobs the request has.
    - `prompt_tokens`: the request's prompt tokens (each prompt once), for `usage`.
    - `n_top`: alternatives per token in log-probabilities; None for no log-probabilities.
    """

    kind = chunk_kind = id_prefix = ""  # the objects' `object` fields, and their ids' prefix

    def __init__(self, model: str, tokenizer: Tokenizer, n_choices: int, prompt_tokens: int,
                 n_top: int | None):
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.tokenizer, self.n_top = model, tokenizer, n_top
        self.prompt_tokens, self.generated = prompt_tokens, [0] * n_choices
        self.loop = asyncio.get_running_loop()
        # Events not yet taken, one per choice: a client that reads slowly gets larger pieces,
        # and the server holds no more than the text it has not sent.
        self.pending: dict[int, Event] = {}
        self.arrived = asyncio.Event()
        self.jobs: list[Job] = []

    def post(self, event: Event) -> None:
        """Called from the engine's thread."""
        try:
            self.loop.call_soon_threadsafe(self._hold, event)
        except RuntimeError:  # the server is shutting down: nobody is waiting
            pass

    def _hold(self, event: Event) -> None:
        held = self.pending.get(event.index)
        if held is None:
            self.pending[event.index] = event
        else:
            held.absorb(event)
        self.arrived.set()

    def cancel(self) -> None:
        """The client is gone: every job leaves its slot at the next chunk."""
        for job in self.jobs:
            job.cancelled = True

    async def events(self, request: Request | None = None) -> AsyncIterator[Event]:
        """Every job's events until each has finished; with `request`, none more once its
        client has disconnected (checked every `DISCONNECT_POLL_S`, events arriving or not)."""
        unfinished, loop = len(self.generated), asyncio.get_running_loop()
        next_check = loop.time() + DISCONNECT_POLL_S
        while unfinished:
            try:
                await asyncio.wait_for(self.arrived.wait(), DISCONNECT_POLL_S)
            except TimeoutError:
                pass
            if request is not None and loop.time() >= next_check:
                next_check = loop.time() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    return
            if not self.arrived.is_set():
                continue
            self.arrived.clear()
            events, self.pending = self.pending, {}
            for event in events.values():
                self.generated[event.index] = event.n_generated
                unfinished -= event.finish_reason is not None
                yield event

    def usage(self) -> dict:
        completion = sum(self.generated)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def header(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def token_text(self, token: int) -> str:
        return token_string(self.tokenizer.token_bytes(token))

    async def stream(self, include_usage: bool) -> AsyncIterator[str]:
        """The answer's chunks as server-sent events; always ends with `[DONE]`."""
        try:
            async for event in self.events():
                if event.finish_reason == "error":
                    yield sse({"error": {"message": event.text, "type": "server_error",
                                         "param": None, "code": None}})
                    break
                for chunk in self.chunks(event):
                    yield sse({**self.header(self.chunk_kind), **chunk,
                               **({"usage": None} if include_usage else {})})
            else:
                if include_usage:
                    yield sse({**self.header(self.chunk_kind), "choices": [],
                               "usage": self.usage()})
            yield DONE
        finally:
            self.cancel()

    async def whole(self, request: Request) -> dict:
        """The finished answer; its jobs are cancelled if the client disconnects first."""
        try:
            async for event in self.events(request):
                if event.finish_reason == "error":
                    raise ApiError(500, event.text)
                self.gather(event)
        finally:
            self.cancel()
        return {**self.header(self.kind), "choices": self.choices(), "usage": self.usage()}

    def chunks(self, event: Event) -> list[dict]:
        """The stream chunks (their `choices`) that one event makes."""
        raise NotImplementedError

    def gather(self, event: Event) -> None:
        raise NotImplementedError

    def choices(self) -> list[dict]:
        raise NotImplementedError


class CompletionAnswer(Answer):
    """`text_completion`s; with `echo`, each choice's text and log-probabilities start with
    its prompt's (`prompts[i]`: the token ids of choice i's prompt as the client gave it, none
    for an empty prompt, which decoding starts from the tokenizer's start tokens)."""

    kind = chunk_kind = "text_completion"  # OpenAI's streamed completions say so too
    id_prefix = "cmpl"

    def __init__(self, *args, prompts: list[list[int]], echo: bool):
        super().__init__(*args)
        self.prompts, self.echo = prompts, echo
        self.prompt_texts = [self.tokenizer.decode(p) for p in prompts]
        self.texts = [""] * len(prompts)
        self.finish: list[str | None] = [None] * len(prompts)
        self.logprobs = [_empty_logprobs() for _ in prompts]
        self.started = [False] * len(prompts)

    def _piece(self, event: Event) -> tuple[str, dict | None]:
        """An event's text and log-probabilities, the echoed prompt before a choice's first.
        Offsets count from the start of the prompt, echoed or not (as OpenAI's do)."""
        i = event.index
        text, tokens, infos = event.text, event.tokens, event.logprobs
        offsets = [len(self.prompt_texts[i]) + offset for offset in event.offsets]
        if self.echo and not self.started[i] and self.prompts[i]:
            prompt = self.prompts[i]
            text, tokens = self.prompt_texts[i] + text, prompt + tokens
            offsets = _offsets(self.tokenizer, prompt) + offsets
            infos = [(None, None, None)] + (event.prompt_logprobs
                                            or [(None, None, None)] * (len(prompt) - 1)) + infos
        self.started[i] = True
        if self.n_top is None:
            return text, None
        logprobs = _empty_logprobs()
        for token, (logprob, top_ids, top_logprobs), offset in zip(tokens, infos, offsets,
                                                                   strict=True):
            logprobs["tokens"].append(self.token_text(token))
            logprobs["token_logprobs"].append(logprob)
            logprobs["top_logprobs"].append(None if top_ids is None else {
                self.token_text(t): lp for t, lp in zip(
                    top_ids[:self.n_top].tolist(), top_logprobs[:self.n_top].tolist(),
                    strict=True)})
            logprobs["text_offset"].append(offset)
        return text, logprobs

    def chunks(self, event: Event) -> list[dict]:
        text, logprobs = self._piece(event)
        return [{"choices": [{"index": event.index, "text": text, "logprobs": logprobs,
                              "finish_reason": event.finish_reason}]}]

    def gather(self, event: Event) -> None:
        text, logprobs = self._piece(event)
        self.texts[event.index] += text
        self.finish[event.index] = event.finish_reason or self.finish[event.index]
        for key, values in (logprobs or {}).items():
            self.logprobs[event.index][key] += values

    def choices(self) -> list[dict]:
        return [{"index": i, "text": text, "finish_reason": finish,
                 "logprobs": None if self.n_top is None else logprobs}
                for i, (text, finish, logprobs) in enumerate(zip(self.texts, self.finish,
                                                                 self.logprobs, strict=True))]


def _offsets(tokenizer: Tokenizer, tokens: list[int]) -> list[int]:
    """Where each token's text starts in the tokens' decoded text."""
    stream, offsets, n = TextStream(tokenizer), [], 0
    for token in tokens:
        offsets.append(n)
        n += len(stream.push([token]))
    return offsets


def _empty_logprobs() -> dict:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


class ChatAnswer(Answer):
    """`chat.completion`s: each choice an assistant message; streamed, a first chunk with the
    role, chunks of content, and a last one with the finish reason."""

    kind, chunk_kind, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, *args):
        super().__init__(*args)
        n = len(self.generated)
        self.texts, self.finish = [""] * n, [None] * n
        self.logprobs: list[list[dict]] = [[] for _ in range(n)]
        self.started = [False] * n

    def _entry(self, token: int, logprob: float, top_ids, top_logprobs) -> dict:
        def one(token: int, logprob: float) -> dict:
            return {"token": self.token_text(token), "logprob": logprob,
                    "bytes": list(self.tokenizer.token_bytes(token))}
        return {**one(token, logprob), "top_logprobs": [
            one(t, lp) for t, lp in zip(top_ids[:self.n_top].tolist(),
                                        top_logprobs[:self.n_top].tolist(), strict=True)]}

    def _logprobs(self, event: Event) -> list[dict]:
        return [self._entry(token, *info)
                for token, info in zip(event.tokens, event.logprobs, strict=True)]

    def chunks(self, event: Event) -> list[dict]:
        def chunk(delta: dict, logprobs=None, finish_reason=None) -> dict:
            return {"choices": [{"index": event.index, "delta": delta, "logprobs": logprobs,
                                 "finish_reason": finish_reason}]}

        out = [] if self.started[event.index] else [chunk({"role": "assistant", "content": ""})]
        self.started[event.index] = True
        if event.text or event.tokens:
            logprobs = None if self.n_top is None else {"content": self._logprobs(event)}
            out.append(chunk({"content": event.text}, logprobs))
        if event.finish_reason:
            out.append(chunk({}, finish_reason=event.finish_reason))
        return out

    def gather(self, event: Event) -> None:
        self.texts[event.index] += event.text
        self.finish[event.index] = event.finish_reason or self.finish[event.index]
        if self.n_top is not None:
            self.logprobs[event.index] += self._logprobs(event)

    def choices(self) -> list[dict]:
        return [{"index": i, "message": {"role": "assistant", "content": text},
                 "logprobs": None if self.n_top is None else {"content": logprobs},
                 "finish_reason": finish}
                for i, (text, finish, logprobs) in enumerate(zip(self.texts, self.finish,
                                                                 self.logprobs, strict=True))]
