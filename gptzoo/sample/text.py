"""Text in, text out: prompts encoded, new tokens decoded into text as they arrive."""

from collections.abc import Iterator

import numpy as np

from gptzoo.data import Tokenizer
from gptzoo.models.protocol import LanguageModel
from gptzoo.sample.loop import generate_tokens


class TextStream:
    """Decodes one row's tokens as they arrive. A byte-level tokenizer may split a UTF-8
    character across tokens, and so across chunks: a piece that ends inside a character
    (decoded as U+FFFD) is held back until the rest arrives, for at most `hold` tokens.

    **Arguments:**

    - `tokenizer`: decodes the tokens.
    - `hold`: the most tokens held back waiting for the rest of a character.
    """

    def __init__(self, tokenizer: Tokenizer, hold: int = 8):
        self.tokenizer, self.hold, self.pending = tokenizer, hold, []

    def push(self, tokens) -> str:
        """The text of `tokens` and of those held back, or '' while a character is cut short."""
        self.pending += [int(t) for t in tokens]
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < self.hold:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        """The text of the tokens held back, whole or not."""
        text, self.pending = self.tokenizer.decode(self.pending) if self.pending else "", []
        return text


def _encode_prompt(tokenizer: Tokenizer, prompt: str) -> np.ndarray:
    # An empty prompt starts from the tokenizer's choice: a newline, or end-of-text for BPE.
    return tokenizer.encode(prompt) if prompt else tokenizer.start_tokens()


def _until_stop(text: str, piece: str, stop: str | None) -> str:
    """`piece` cut just after the first `stop` in `text + piece` ('' once `text` holds it)."""
    if stop is None or stop not in text + piece:
        return piece
    return (text + piece)[: (text + piece).index(stop) + len(stop)][len(text):]


def stream_batch(model: LanguageModel, tokenizer: Tokenizer, prompts: list[str], *,
                 max_new_tokens: int = 500, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seeds: list[int] | None = None,
                 stop: str | None = None, use_cache: bool = True, context: str | None = None,
                 keep: float = 0.5) -> Iterator[list[str]]:
    """Yield, for each prompt, the next piece of its continuation; after `stop` a row yields ''."""
    texts = ["" for _ in prompts]
    decoders = [TextStream(tokenizer) for _ in prompts]
    for tokens in generate_tokens(model, [_encode_prompt(tokenizer, p) for p in prompts],
                                  max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seeds=seeds, use_cache=use_cache,
                                  context=context, keep=keep):
        pieces = [_until_stop(t, d.push(row), stop)
                  for t, d, row in zip(texts, decoders, tokens, strict=True)]
        texts = [t + p for t, p in zip(texts, pieces, strict=True)]
        yield pieces
        if stop is not None and all(stop in t for t in texts):
            return
    rest = [_until_stop(t, d.flush(), stop) for t, d in zip(texts, decoders, strict=True)]
    if any(rest):  # a character cut short by the end of generation
        yield rest


def stream(model: LanguageModel, tokenizer: Tokenizer, prompt: str = "", *, seed: int = 0,
           **kwargs) -> Iterator[str]:
    """Yield the continuation of one prompt piece by piece (the prompt is not repeated).

    Keyword arguments as `generate`.
    """
    for pieces in stream_batch(model, tokenizer, [prompt], seeds=[seed], **kwargs):
        yield pieces[0]


def generate(model: LanguageModel, tokenizer: Tokenizer, prompt: str | list[str] = "", *,
             seed: int = 0, **kwargs) -> str | list[str]:
    """Each prompt followed by its continuation.

    Options: `max_new_tokens` (500), `temperature` (1.0; 0 is greedy), `top_k`, `top_p`,
    `stop` (a string that ends a row's text), `use_cache` (True), `context` ("shift", "crop",
    "slide" or None: slide for a sliding-window model, else shift) and `keep` (0.5), as in
    `gptzoo.sample`. Every row uses `seed`.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    texts = list(prompts)
    for pieces in stream_batch(model, tokenizer, prompts, seeds=[seed] * len(prompts), **kwargs):
        texts = [t + p for t, p in zip(texts, pieces, strict=True)]
    return texts[0] if isinstance(prompt, str) else texts
