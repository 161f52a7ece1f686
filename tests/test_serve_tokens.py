"""Tokens in `gptzoo serve`'s answers where a token is not a whole piece of text: byte tokens
inside a UTF-8 character are named by their bytes (`bytes:\\xNN`, OpenAI's form) and their text
offsets point at their character; a stop string ends the tokens as it ends the text."""

import asyncio

import numpy as np
import pytest

from gptzoo.data import ByteTokenizer, CharTokenizer
from gptzoo.serve.answer import ChatAnswer, CompletionAnswer
from gptzoo.serve.job import Job, Sampling

PROMPT, CONTINUATION = "café 😀", " 語!"
TOP = np.array([0xE8, 0xAA, 0x9E, 0x80, 0x20])  # five alternatives, four not whole text
TOP_LOGPROBS = np.log(np.array([0.4, 0.2, 0.1, 0.05, 0.01]))


def events_of(tokenizer, prompt: str, generated: str, stops=(), echo=False,
              logprobs=True) -> list:
    """The events of a job fed `generated`'s tokens in one chunk, as the engine feeds them."""
    events, prompt_ids, tokens = [], tokenizer.encode(prompt), tokenizer.encode(generated)
    job = Job(0, prompt_ids, len(tokens), Sampling(), list(stops), echo, logprobs, tokenizer,
              events.append)
    infos = [(-0.5, TOP, TOP_LOGPROBS)] * len(tokens) if logprobs else None
    prompt_infos = [(-1.0, TOP, TOP_LOGPROBS)] * (len(prompt_ids) - 1) if echo else None
    job.deliver(list(tokens), infos, prompt_infos)
    return events


def answer(cls, *args, **kwargs):
    async def make():  # an answer belongs to the event loop it is made on
        return cls(*args, **kwargs)
    return asyncio.run(make())


def byte_name(b: int) -> str:
    return chr(b) if b < 0x80 else f"bytes:\\x{b:02x}"


def test_echoed_byte_tokens_are_named_by_their_bytes_at_their_characters_offsets():
    tokenizer = ByteTokenizer()
    data = (PROMPT + CONTINUATION).encode("utf-8")
    completion = answer(CompletionAnswer, "m", tokenizer, 1, len(PROMPT.encode()), 5,
                        prompts=[list(tokenizer.encode(PROMPT))], echo=True)
    for event in events_of(tokenizer, PROMPT, CONTINUATION, echo=True):
        completion.gather(event)
    choice = completion.choices()[0]
    assert choice["text"] == PROMPT + CONTINUATION
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [byte_name(b) for b in data]
    assert logprobs["text_offset"] == [len(data[:i].decode("utf-8", errors="ignore"))
                                       for i in range(len(data))]
    assert logprobs["token_logprobs"][:2] == [None, -1.0]
    for top in logprobs["top_logprobs"][1:]:
        assert top == {byte_name(int(b)): lp for b, lp in zip(TOP, TOP_LOGPROBS, strict=True)}


def test_chat_logprobs_carry_each_tokens_own_bytes():
    tokenizer = ByteTokenizer()
    chat = answer(ChatAnswer, "m", tokenizer, 1, 3, 2)
    for event in events_of(tokenizer, "hi", CONTINUATION):
        chat.gather(event)
    content = chat.choices()[0]["logprobs"]["content"]
    assert [entry["bytes"] for entry in content] == [[b] for b in CONTINUATION.encode("utf-8")]
    assert [entry["token"] for entry in content] == [byte_name(b) for b in
                                                     CONTINUATION.encode("utf-8")]
    assert [t["bytes"] for t in content[0]["top_logprobs"]] == [[0xE8], [0xAA]]


@pytest.mark.parametrize("logprobs", [True, False])  # token by token; the chunk at once
def test_a_stop_string_ends_the_tokens_and_their_count_where_it_ends_the_text(logprobs):
    tokenizer = CharTokenizer.from_text("abcdefgh")
    (event,) = events_of(tokenizer, "a", "bcdefgh", stops=["de"], logprobs=logprobs)
    assert (event.text, event.finish_reason, event.n_generated) == ("bc", "stop", 4)
    assert tokenizer.decode(event.tokens) == "bcde"
    assert (event.offsets, len(event.logprobs)) == (([0, 1, 2, 3], 4) if logprobs else ([], 0))
