"""`gptzoo serve` through the official openai client against a live server (tests/live_server.py)
over the shared tiny run (block_size 32): answers equal `gptzoo sample`'s, alone or in a batch,
streamed or whole; echo + logprobs equal the model's own forward and `gptzoo.evaluate`; chat is
the completion of the documented plain template; nothing compiles after warm-up."""

import re
from concurrent.futures import ThreadPoolExecutor

import equinox as eqx
import httpx
import live_server
import numpy as np
from conftest import SHAKESPEARE, gptzoo_in_process
from live_server import KEY, compilations

import gptzoo

server, client = live_server.server, live_server.client  # a live server for this module

MODEL = "tiny"  # the shared run's directory name
SEPARATOR = "\n---------------\n"


def sample_continuations(run_dir, prompt: str, *args) -> list[str]:
    """What `gptzoo sample --prompt PROMPT ARGS` prints after the prompt, per sample."""
    result = gptzoo_in_process("sample", "--ckpt", run_dir, "--prompt", prompt, *args)
    assert result.returncode == 0, result.stderr
    texts = result.stdout.removesuffix("\n").split(SEPARATOR)
    assert all(text.startswith(prompt) for text in texts)
    return [text[len(prompt):] for text in texts]


def test_greedy_completion_equals_gptzoo_sample_past_the_window(client, trained_run):
    # 80 new characters after a 6-character prompt: the 32-token window shifts three times.
    out = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=80, temperature=0)
    choice = out.choices[0]
    assert [choice.text] == sample_continuations(trained_run, "ROMEO:", "--max-new-tokens", "80",
                                                 "--temperature", "0")
    assert choice.finish_reason == "length" and out.object == "text_completion"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (6, 80)


def test_seeded_samples_equal_gptzoo_sample(client, trained_run):
    settings = dict(temperature=0.8, top_p=0.9, seed=5)
    out = client.completions.create(model=MODEL, prompt="JULIET:", max_tokens=60, n=2,
                                    extra_body={"top_k": 20}, **settings)
    expected = sample_continuations(trained_run, "JULIET:", "--max-new-tokens", "60",
                                    "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20",
                                    "--seed", "5", "--num-samples", "2")
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == expected
    assert expected[0] != expected[1]


def test_eight_concurrent_requests_each_equal_the_request_alone(client):
    prompts = ["ROMEO:", "JULIET:\nO", SHAKESPEARE.read_text()[:30], "a", "MENENIUS:", "Nay, ",
               "First Citizen:", "\n"]
    requests = [dict(model=MODEL, prompt=p, max_tokens=30 + 7 * i,
                     **({"temperature": 0} if i % 2 else {"seed": i, "top_p": 0.95}))
                for i, p in enumerate(prompts)]
    alone = [client.completions.create(**r).choices[0].text for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: client.completions.create(**r).choices[0].text,
                                 requests))
    assert together == alone


def test_stream_pieces_add_up_to_the_whole_answer(client, server):
    request = dict(model=MODEL, prompt="ROMEO:", max_tokens=40, seed=1)
    whole = client.completions.create(**request)
    chunks = list(client.completions.create(**request, stream=True,
                                            stream_options={"include_usage": True}))
    # Pieces a slow reader has not taken yet are merged, so how many there are depends on the
    # machine's load: a long answer's first piece shows that it arrives in pieces.
    assert len(chunks) >= 2 and chunks[0].choices[0].text
    with client.completions.create(**{**request, "max_tokens": 2000}, stream=True) as long:
        first = next(iter(long))
    assert first.choices[0].finish_reason is None and len(first.choices[0].text) < 2000
    assert {c.object for c in chunks} == {"text_completion"}  # as OpenAI's chunks say
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage

    with httpx.stream("POST", f"{server.url}/v1/completions", json={**request, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_chat_answers_the_completion_of_the_plain_template(client):
    messages = [{"role": "user", "content": "Speak."}]
    prompt = "USER:\nSpeak.\n\nASSISTANT:\n"  # the plain template, as docs/serving.md gives it
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30,
                                          temperature=0)
    text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30,
                                     temperature=0).choices[0].text
    message = chat.choices[0].message
    assert (message.role, message.content) == ("assistant", text)
    assert chat.object == "chat.completion" and chat.usage.prompt_tokens == len(prompt)

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_ends_the_text_before_the_stop_string(client):
    request = dict(model=MODEL, prompt="ROMEO:", max_tokens=100, seed=2)
    full = client.completions.create(**request).choices[0].text
    stop = full[40:42]
    expected = full[:full.index(stop)]
    answer = client.completions.create(**request, stop=[stop, "@@"], logprobs=0)
    out = answer.choices[0]
    assert (out.text, out.finish_reason) == (expected, "stop")
    # Tokens (one per character here) end with the one that completes the stop string.
    assert "".join(out.logprobs.tokens) == expected + stop
    assert answer.usage.completion_tokens == len(expected + stop)
    streamed = client.completions.create(**request, stop=[stop, "@@"], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_an_empty_prompt_echoes_nothing_and_offsets_start_at_zero(client):
    request = dict(model=MODEL, prompt="", max_tokens=5, seed=4, logprobs=0)
    alone = client.completions.create(**request).choices[0]
    echoed = client.completions.create(**request, echo=True).choices[0]
    assert echoed.text == alone.text and len(alone.text) == 5
    assert echoed.logprobs.text_offset == alone.logprobs.text_offset == list(range(5))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def forward_logprobs(model, tokens) -> np.ndarray:
    """float64 log-probabilities at each position of `tokens`, from the model's forward over a
    whole window (right-padded: causal attention keeps the padding out of what we read)."""
    window = np.zeros(model.block_size, np.int32)
    window[:len(tokens)] = tokens
    return log_softmax(np.asarray(eqx.filter_jit(model)(window), np.float64))[:len(tokens)]


def test_echo_logprobs_equal_the_models_forward_and_evaluate(client, trained_run):
    model, tokenizer = gptzoo.load(trained_run)
    text = SHAKESPEARE.read_text()[100:132]  # a whole window of 32 tokens
    tokens = tokenizer.encode(text)
    reference = forward_logprobs(model, tokens)
    out = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True,
                                    logprobs=5).choices[0]
    logprobs = out.logprobs
    assert out.text == text and logprobs.tokens == list(text)
    assert logprobs.text_offset == list(range(len(text)))
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = reference[np.arange(len(text) - 1), tokens[1:]]
    np.testing.assert_allclose(logprobs.token_logprobs[1:], expected, atol=1e-4)
    for position, top in enumerate(logprobs.top_logprobs[1:]):
        best = np.argsort(-reference[position])[:5]
        assert set(top) == {tokenizer.decode([t]) for t in best}
        np.testing.assert_allclose(sorted(top.values()), sorted(reference[position, best]),
                                   atol=1e-4)
    # gptzoo's evaluate scores every token after the first with the same context.
    loss = gptzoo.evaluate(model, tokens, model.block_size).loss
    assert abs(-np.mean(logprobs.token_logprobs[1:]) - loss) < 1e-4


def test_logprobs_past_the_window_follow_the_context_shift(client, trained_run):
    """The log-probability of each generated token under the context `gptzoo sample` holds:
    all tokens so far, until they pass block_size; then the last half of them."""
    model, tokenizer = gptzoo.load(trained_run)
    out = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=60, seed=3,
                                    logprobs=1).choices[0]
    logprobs = out.logprobs
    assert logprobs.tokens == list(out.text)
    assert logprobs.text_offset == list(range(6, 6 + 60))  # counted from the prompt's start
    context, expected = list(tokenizer.encode("ROMEO:")), []
    for token in tokenizer.encode(out.text):
        if len(context) > model.block_size:
            context = context[-model.block_size // 2:]
        expected.append(forward_logprobs(model, context)[-1, token])
        context.append(token)
    np.testing.assert_allclose(logprobs.token_logprobs, expected, atol=1e-4)
    for logprob, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert len(top) == 1 and max(top.values()) >= logprob - 1e-6


def test_models_health_and_metrics(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("gptzoo_requests_running", "gptzoo_requests_waiting",
                 "gptzoo_prompt_tokens_total", "gptzoo_generation_tokens_total",
                 "gptzoo_time_to_first_token_seconds_bucket",
                 "gptzoo_time_per_output_token_seconds_bucket"):
        assert f"\n{name}" in text, name


def test_its_start_up_lines_say_where_it_listens_and_which_layout_it_decodes_with(server):
    out = server.output()
    assert f"as {MODEL!r} at {server.url}/v1 with 4 slots" in out
    assert re.search(r"ready: programs compiled in [\d.]+ s; weight layout by rows decoded: "
                     r"4 (plain|row-wise)\n", out), out


def test_nothing_compiles_after_warm_up(client, server):
    """Every kind of request once more (each prefill bucket, echo, sampling settings, n > 1,
    a context shift, chat, streams, stops); the count includes every earlier test's requests."""
    client.completions.create(model=MODEL, prompt="a" * 32, max_tokens=3, echo=True, logprobs=2)
    client.completions.create(model=MODEL, prompt=["a", "b" * 20], max_tokens=70, n=2, seed=9,
                              temperature=1.3, top_p=0.5, extra_body={"top_k": 3}, stop="\n")
    list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                        max_tokens=5, stream=True, logprobs=True,
                                        top_logprobs=2))
    assert server.warm_compilations > 0  # the counter counts (the seed's program, at least)
    assert compilations(server) == server.warm_compilations
