"""Parts of `gptzoo serve` without a server: chat templates rendered as transformers renders
them, the traced token picker against `gptzoo.sample`'s, stop strings cut in a stream, the
engine outliving a failed decoding step, its queue counting the jobs it is prefilling, prompts
that arrive together prefilled together, and the decode form warm-up times faster kept."""

import json
import queue
import threading
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

import gptzoo
import gptzoo.serve.engine as engine_module
from gptzoo.sample import pick_token as sample_pick_token
from gptzoo.serve.chat import ChatTemplate
from gptzoo.serve.engine import Engine, QueueFull
from gptzoo.serve.errors import ApiError
from gptzoo.serve.job import Job, Sampling, StopText
from gptzoo.serve.programs import pick_rows, pick_token

# Loop controls, tojson on a field (not escaped), special tokens, raise_exception, the generation
# marker and the generation prompt, laid out on indented lines as published templates are (which
# trim_blocks and lstrip_blocks take out).
TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'system' and loop.first %}
[sys] {{ message['content'] }}
        {% continue %}
    {% endif %}
<|{{ message['role'] }}|>
    {% if message['role'] == 'assistant' %}
        {% generation %}{{ message['content'] }}{% endgeneration %}
    {% else %}
{{ message['content'] }}
    {% endif %}
    {% if message.meta is defined %} {{ message.meta | tojson }}{% endif %}
{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}"""
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Is 1 < 2 & 'yes'?", "meta": {"lang": "fr", "note": "<é>"}},
    {"role": "assistant", "content": "Oui."},
    {"role": "user", "content": "Merci"},
]


def saved_tokenizer(folder, template: str) -> PreTrainedTokenizerFast:
    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
        bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    return tokenizer


def test_a_saved_template_renders_as_transformers_renders_it(tmp_path):
    tokenizer = saved_tokenizer(tmp_path, TEMPLATE)
    expected = tokenizer.apply_chat_template(MESSAGES, tokenize=False,
                                             add_generation_prompt=True)
    assert ChatTemplate.for_run(tmp_path).render(MESSAGES) == expected
    assert '"<é>"' in expected  # the check covers tojson's unescaped output


def test_a_template_in_tokenizer_config_renders_as_transformers_renders_it(tmp_path):
    tokenizer = saved_tokenizer(tmp_path, TEMPLATE)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)  # the older layout: in the config
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    expected = tokenizer.apply_chat_template(MESSAGES, tokenize=False,
                                             add_generation_prompt=True)
    assert ChatTemplate.for_run(tmp_path).render(MESSAGES) == expected


def test_raise_exception_is_a_400_on_messages(tmp_path):
    saved_tokenizer(tmp_path, TEMPLATE)
    with pytest.raises(ApiError) as caught:
        ChatTemplate.for_run(tmp_path).render([{"role": "tool", "content": "x"}])
    assert caught.value.status == 400 and caught.value.param == "messages"
    assert "unknown role tool" in caught.value.message


def test_the_sandbox_refuses_python_internals():
    template = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ApiError):
        template.render(MESSAGES)


def test_a_run_without_a_template_uses_the_plain_one(tmp_path):
    assert ChatTemplate.for_run(tmp_path).render(MESSAGES[:2]) == (
        "SYSTEM:\nBe brief.\n\nUSER:\nIs 1 < 2 & 'yes'?\n\nASSISTANT:\n")


SETTINGS = [(0.0, None, None), (1.0, None, None), (0.7, 5, None), (1.3, None, 0.6),
            (0.9, 3, 0.8), (1.0, 1, None), (2.0, None, 1.0)]


@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
def test_traced_settings_pick_the_tokens_of_the_static_ones(temperature, top_k, top_p):
    vocab, rows = 50, 64
    logits = jax.random.normal(jax.random.PRNGKey(0), (rows, vocab)) * 2
    noise = jax.random.gumbel(jax.random.PRNGKey(1), (rows, vocab))
    expected = jax.vmap(lambda lg, z: sample_pick_token(lg, z, temperature, top_k, top_p))(
        logits, noise)
    traced = jax.jit(jax.vmap(pick_token, in_axes=(0, 0, None, None, None)))(
        logits, noise, jnp.float32(temperature), jnp.int32(top_k or vocab),
        jnp.float32(top_p or 1.0))
    np.testing.assert_array_equal(traced, expected)


@pytest.mark.parametrize("settings", [SETTINGS[:1] * 3, [SETTINGS[0], SETTINGS[1], SETTINGS[6]],
                                      SETTINGS], ids=["greedy", "plain", "filtered"])
def test_rows_with_their_own_settings_pick_the_tokens_of_the_static_ones(settings):
    """Each of the batch's rows as `gptzoo.sample` picks it, by whichever branch the batch's
    settings take (all greedy; sampled without top-k or top-p; some filtered)."""
    vocab, settings = 50, settings * (48 // len(settings))
    rows = len(settings)
    logits = jax.random.normal(jax.random.PRNGKey(2), (rows, vocab)) * 2
    noise = jax.random.gumbel(jax.random.PRNGKey(3), (rows, vocab))
    expected = [sample_pick_token(lg, z, *row) 
                for lg, z, row in zip(logits, noise, settings, strict=True)]
    temperature, top_k, top_p = zip(*settings, strict=True)
    picked = jax.jit(lambda *settings: pick_rows(logits, noise, SimpleNamespace(
        temperature=settings[0], top_k=settings[1], top_p=settings[2])))(
        jnp.float32(temperature), jnp.int32([k or vocab for k in top_k]),
        jnp.float32([p or 1.0 for p in top_p]))
    np.testing.assert_array_equal(picked, expected)


def test_stop_text_holds_back_what_may_begin_a_stop_and_cuts_before_it():
    text = StopText(["\n\n", "END"])
    shown = [text.push(piece) for piece in ["ab", "c\n", "E", "N", "x\n", "\nrest"]]
    # "\n", "E" and "EN" may begin a stop: each is held until a later piece decides.
    assert shown == [("ab", False), ("c", False), ("\n", False), ("", False), ("ENx", False),
                     ("", True)]
    assert StopText([]).push("anything") == ("anything", False)
    held = StopText(["xyz"])
    assert held.push("abx") == ("ab", False) and held.flush() == "x"


def events_until_finished(events: queue.Queue) -> list:
    received = [events.get(timeout=60)]
    while received[-1].finish_reason is None:
        received.append(events.get(timeout=60))
    return received


def test_a_failed_step_ends_its_requests_with_an_error_and_the_engine_goes_on(trained_run,
                                                                             monkeypatch):
    model, tokenizer = gptzoo.load(trained_run)
    monkeypatch.setattr(Engine, "warm_up", lambda self: None)  # compiled as it goes instead
    engine = Engine(model, n_slots=2, max_queue=2)
    engine.start()
    events = queue.Queue()

    def job(index: int) -> Job:
        return Job(index, tokenizer.encode("ROMEO:"), 20, Sampling(temperature=0), [], False,
                   False, tokenizer, events.put)

    def broken(*args):
        raise RuntimeError("the device is gone")

    working = engine_module.decode_chunk
    try:
        monkeypatch.setattr(engine_module, "decode_chunk", broken)
        engine.submit([job(0)])
        failed = events_until_finished(events)
        assert failed[-1].finish_reason == "error" and "the device is gone" in failed[-1].text
        monkeypatch.setattr(engine_module, "decode_chunk", working)
        engine.submit([job(1)])
        answered = events_until_finished(events)
        assert answered[-1].finish_reason == "length" and answered[-1].n_generated == 20
    finally:
        engine.stop()


def test_a_job_being_prefilled_still_counts_against_the_queue(trained_run, monkeypatch):
    """A job leaves the queue before its prefill and takes its slot after: in between, a
    request must not slip past a full queue (and then wait behind streams that never end)."""
    model, tokenizer = gptzoo.load(trained_run)
    monkeypatch.setattr(Engine, "warm_up", lambda self: None)
    engine = Engine(model, n_slots=1, max_queue=1)
    prefilling, release, start = threading.Event(), threading.Event(), Engine._start

    def held_start(self, slot, job):
        prefilling.set()
        release.wait()
        start(self, slot, job)

    monkeypatch.setattr(Engine, "_start", held_start)
    engine.start()
    events = queue.Queue()

    def job(index: int) -> Job:
        return Job(index, tokenizer.encode("ROMEO:"), 2, Sampling(temperature=0), [], False,
                   False, tokenizer, events.put)

    try:
        engine.submit([job(0)])
        assert prefilling.wait(60)
        engine.submit([job(1)])  # the queue's one place
        with pytest.raises(QueueFull):
            engine.submit([job(2)])
    finally:
        release.set()
        engine.stop()


def test_prompts_arriving_together_prefill_in_one_program_each_bucket(trained_run, monkeypatch):
    """Four short prompts waiting at once take one 4-row prefill; a fifth of another bucket its
    own; every answer still equals the same request alone."""
    model, tokenizer = gptzoo.load(trained_run)
    monkeypatch.setattr(Engine, "warm_up", lambda self: None)
    rows_per_call, prefill = [], engine_module.prefill

    def counted(model, slots, slot, *args):
        rows_per_call.append(len(slot))
        return prefill(model, slots, slot, *args)

    monkeypatch.setattr(engine_module, "prefill", counted)
    prompts = ["ROMEO:", "JULIET:", "Nay", "O", "First Citizen:\nBefore"]  # buckets 16, 32

    def answers(batch: list[str]) -> list[list[int]]:
        engine, events = Engine(model, n_slots=8, max_queue=0), queue.Queue()
        jobs = [Job(i, tokenizer.encode(p), 12, Sampling(temperature=0), [], False, False,
                    tokenizer, events.put) for i, p in enumerate(batch)]
        engine.submit(jobs)  # all waiting before the engine's first step
        engine.start()
        received = []
        try:
            while sum(e.finish_reason is not None for e in received) < len(jobs):
                received.append(events.get(timeout=60))
        finally:
            engine.stop()
        return [sum((e.tokens for e in received if e.index == i), []) for i in range(len(jobs))]

    together = answers(prompts)
    assert sorted(rows_per_call) == [1, 4]  # the 4 short prompts, and the long one alone
    assert together == [answers([p])[0] for p in prompts]


@pytest.mark.parametrize("slow", ["plain", "row-wise"])
def test_warm_up_keeps_the_faster_decode_form_for_each_width(trained_run, monkeypatch, slow):
    model, _ = gptzoo.load(trained_run)
    engine = Engine(model, n_slots=8, max_queue=0)
    assert engine.many is not engine.few  # on CPU, from MIN_ROWS rows
    slowed = engine.few if slow == "plain" else engine.many
    decode_chunk = engine_module.decode_chunk

    def timed(model, *args):
        if model is slowed:
            time.sleep(0.01)
        return decode_chunk(model, *args)

    monkeypatch.setattr(engine_module, "decode_chunk", timed)
    engine._choose_forms()
    kept = engine.many if slow == "plain" else engine.few
    assert [engine.forms[w] for w in engine.widths] == [engine.few] * 2 + [kept] * 2
