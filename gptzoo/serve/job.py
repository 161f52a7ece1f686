"""One choice of one request on the host: its settings, its tokens turned into text pieces
(cut at a stop string or the end-of-text token) posted to the request as they arrive, and what
the engine tracks of its generation (`Row`) and of each prefill it needs (`Prefill`)."""

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gptzoo.data import Tokenizer
from gptzoo.sample import TextStream


@dataclass(frozen=True)
class Sampling:
    """A choice's sampling settings, as `gptzoo sample` takes them."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0


@dataclass
class Event:
    """What one choice produced since its last event.

    `logprobs` holds `(logprob, top_ids, top_logprobs)` per token in `tokens`, and `offsets`
    where each token's text starts in the choice's generated text (a token inside a character,
    where the character starts); `prompt_logprobs` (first event, with echo) the log-probabilities
    of the prompt's tokens after the first.
    """

    index: int
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", or "error" (then `text` says why)
    prompt_logprobs: list[tuple] | None = None
    n_generated: int = 0  # tokens sampled so far, an end-of-text token included

    def absorb(self, later: "Event") -> None:
        """Take in the choice's next event (an error replaces what it ends)."""
        if later.finish_reason == "error":
            self.text, self.tokens, self.logprobs, self.offsets = later.text, [], [], []
        else:
            self.text += later.text
            self.tokens += later.tokens
            self.logprobs += later.logprobs
            self.offsets += later.offsets
        self.finish_reason, self.n_generated = later.finish_reason, later.n_generated


class StopText:
    """A choice's text as it grows, ended before the first of `stops`. A tail that could begin
    a stop string is held back, so a stream never shows text that a stop later removes."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.shown = stops, "", 0

    def push(self, piece: str) -> tuple[str, bool]:
        """The text that may be shown now, and whether a stop string ended the choice."""
        self.text += piece
        found = [i for i in (self.text.find(s, self.shown) for s in self.stops) if i >= 0]
        if found:
            return self._show(min(found)), True
        held = next((k for k in range(min(len(self.text) - self.shown,
                                          max(map(len, self.stops), default=1) - 1), 0, -1)
                     if any(s.startswith(self.text[-k:]) for s in self.stops)), 0)
        return self._show(len(self.text) - held), False

    def flush(self) -> str:
        return self._show(len(self.text))

    def _show(self, end: int) -> str:
        piece, self.shown = self.text[self.shown:end], end
        return piece


class Job:
    """One choice: the prompt's tokens, how many to generate, and where its events go.

    **Arguments:**

    - `index`: the choice's index in its response.
    - `prompt`: the prompt's token ids.
    - `max_tokens`: how many tokens to generate at most.
    - `sampling`: its `Sampling` settings.
    - `stops`: strings that end the choice (not included in its text).
    - `echo`: score the prompt's tokens (the first event carries their log-probabilities).
    - `logprobs`: whether events carry their tokens' log-probabilities.
    - `tokenizer`: decodes the tokens; its `end_of_text` ends the choice.
    - `post`: called with each `Event`, from the engine's thread.
    """

    def __init__(self, index: int, prompt: np.ndarray, max_tokens: int, sampling: Sampling,
                 stops: list[str], echo: bool, logprobs: bool, tokenizer: Tokenizer,
                 post: Callable[[Event], None]):
        self.index, self.prompt, self.max_tokens = index, prompt, max_tokens
        self.sampling, self.echo, self.logprobs, self.post = sampling, echo, logprobs, post
        self.end_of_text = tokenizer.end_of_text
        self.decoder, self.stop_text = TextStream(tokenizer, context=prompt), StopText(stops)
        self.n_generated = 0
        self.n_decoded = 0  # characters decoded so far, counted where offsets are wanted
        self.finished = False  # its last event is posted
        self.cancelled = False  # set by the request's handler; the engine drops the job
        self.created = time.perf_counter()
        self.last_delivery: float | None = None  # when tokens last went out (None: not yet)

    def deliver(self, tokens: list[int], infos: list[tuple] | None = None,
                prompt_infos: list[tuple] | None = None) -> bool:
        """Take newly sampled tokens (with their `TokenInfo` rows when the job wants
        log-probabilities) and post what they add, up to the token that ends the choice (the
        end-of-text token, or the one that completes a stop string); True once it is finished."""
        event = Event(self.index, prompt_logprobs=prompt_infos)
        tokens = [int(t) for t in tokens[:self.max_tokens - self.n_generated]]
        ends_text = self.end_of_text in tokens
        if ends_text:
            tokens = tokens[:tokens.index(self.end_of_text)]
        text, stopped = self._read(tokens, infos, event)
        if ends_text and not stopped:
            self.n_generated += 1  # the end-of-text token: sampled, never shown
            event.finish_reason = "stop"
        ended = event.finish_reason is not None or self.n_generated >= self.max_tokens
        if ended and not stopped:  # the text held back, and a character cut short
            rest, stopped = self.stop_text.push(self.decoder.flush())
            text += rest if stopped else rest + self.stop_text.flush()
        event.text = text
        if stopped:
            event.finish_reason = "stop"
        elif ended:
            event.finish_reason = event.finish_reason or "length"
        event.n_generated = self.n_generated
        self.last_delivery = time.perf_counter()
        self.finished = event.finish_reason is not None
        self.post(event)
        return self.finished

    def _read(self, tokens: list[int], infos: list[tuple] | None,
              event: Event) -> tuple[str, bool]:
        """Decode `tokens` into `event` up to the one that completes a stop string: (the text
        shown, whether a stop string ended it). Without log-probabilities the tokens decode at
        once, token by token only where a stop string ends them; with them, token by token, for
        each token's offset."""
        if infos is None:
            decoder, stop_text = copy.copy(self.decoder), copy.copy(self.stop_text)
            text, stopped = self.stop_text.push(self.decoder.push(tokens))
            if not stopped:
                self.n_generated += len(tokens)
                event.tokens = tokens
                return text, False
            self.decoder, self.stop_text = decoder, stop_text  # as before the chunk
        text = ""
        for i, token in enumerate(tokens):
            self.n_generated += 1
            event.tokens.append(token)
            if infos is not None:
                event.offsets.append(self.n_decoded)
                event.logprobs.append(infos[i])
            piece = self.decoder.push([token])
            self.n_decoded += len(piece)
            shown, stopped = self.stop_text.push(piece)
            text += shown
            if stopped:
                return text, True
        return text, False

    def fail(self, message: str) -> None:
        self.finished = True
        self.post(Event(self.index, text=message, finish_reason="error"))


@dataclass
class Row:
    """A slot's generation as the host tracks it."""

    job: Job
    position: int  # where the token to feed goes
    remaining: int  # tokens still to sample
    t: int  # the next draw's index
    key: np.ndarray
    context: list[int]  # the generation's last block_size tokens, the one to feed last


@dataclass
class Prefill:
    """A prompt (a new job's) or a kept context (a shifted generation's) to encode into `slot`
    and sample one token after, with draw `t` of `key`."""

    slot: int
    tokens: np.ndarray
    key: np.ndarray
    t: int
    sampling: Sampling
    echo: bool = False  # also score the prompt's tokens
    job: Job | None = None  # the new job, or
    row: Row | None = None  # the generation a context shift continues
