"""Text in, text out: prompts encoded, new tokens decoded into text as they arrive."""

from collections.abc import Iterator

import numpy as np

from gptzoo.data import Tokenizer
from gptzoo.models.protocol import LanguageModel
from gptzoo.sample.loop import generate_tokens

CONTEXT_TOKENS = 5  # prompt tokens a row's first piece is decoded after, as vLLM's


class TextStream:
    """Decodes one row's tokens as they arrive, as vLLM's incremental detokenizer does. Each
    piece is the text the new tokens add to the few before them, decoded together: a tokenizer
    may drop a word's leading space when it starts the decoded text (SentencePiece's does), and
    a byte-level one may split a UTF-8 character across tokens. A piece that would end inside a
    character (decoded as U+FFFD) stops before it; the rest waits for the next tokens, for at
    most `hold` tokens.

    **Arguments:**

    - `tokenizer`: decodes the tokens.
    - `context`: the tokens before the first pushed (the prompt); their text is not shown.
    - `hold`: the most tokens held back waiting for the rest of a character.
    """

    def __init__(self, tokenizer: Tokenizer, context=(), hold: int = 8):
        self.tokenizer, self.hold = tokenizer, hold
        self.tokens = [int(t) for t in context][-CONTEXT_TOKENS:]
        self.shown = len(self.tokens)  # tokens[:shown] are context (shown last), the rest new
        self.in_prompt = True  # the context is the prompt's, which may end inside a character

    def push(self, tokens) -> str:
        """The text that `tokens` and those held back add, or '' while a character is cut
        short."""
        self.tokens = self.tokens + [int(t) for t in tokens]  # a copy of the stream keeps its own
        return self._advance(whole=False)

    def flush(self) -> str:
        """The text of the tokens held back, whole or not."""
        return self._advance(whole=True)

    def _advance(self, whole: bool) -> str:
        n_new = len(self.tokens) - self.shown
        if n_new == 0:
            return ""
        decode = self.tokenizer.decode
        # The last end (at most `hold` back) that does not cut a character, else all tokens.
        ends = [len(self.tokens)] if whole else range(len(self.tokens), self.shown, -1)[:self.hold]
        for end in ends:
            text = decode(self.tokens[:end])
            if not text.endswith("\ufffd"):
                break
        else:
            if not whole and n_new < self.hold:
                return ""
            end, text = len(self.tokens), decode(self.tokens)
        before = decode(self.tokens[:self.shown])
        piece = text[len(before.rstrip("\ufffd") if self.in_prompt else before):]
        self.in_prompt = False
        self.tokens = self.tokens[self.shown:]  # the tokens shown now are the next context
        self.shown = end - self.shown
        return piece


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
    encoded = [_encode_prompt(tokenizer, p) for p in prompts]
    decoders = [TextStream(tokenizer, context=p) for p in encoded]
    for tokens in generate_tokens(model, encoded,
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
