"""`gptzoo serve` refusing what it cannot do, and surviving it: bad requests are 400s naming the
field (OpenAI's error object), a full queue is 429, a missing key 401; a client that disconnects
frees its slot; the command's own bad options are one-line errors. A live server of
tests/live_server.py: 4 slots, a queue of 4."""

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import live_server
import openai
import pytest
from conftest import gptzoo_in_process
from live_server import KEY, QUEUE, SLOTS, metric
from test_cli import assert_one_line_error

server, client = live_server.server, live_server.client  # a live server for this module

LONG = 10**6  # tokens: a stream that runs until its client leaves
DEADLINE_S = 60  # the most a bounded wait below lasts


def post(server, path: str, body, key: str | None = KEY) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=60)


def assert_still_answers(client) -> None:
    out = client.completions.create(model="tiny", prompt="a", max_tokens=2, temperature=0)
    assert out.usage.completion_tokens == 2


BAD_REQUESTS = {
    "malformed JSON": ("/v1/completions", b'{"prompt": "a",', None),
    "wrong type": ("/v1/completions", {"prompt": "a", "max_tokens": "lots"}, "max_tokens"),
    "negative max_tokens": ("/v1/completions", {"prompt": "a", "max_tokens": -1}, "max_tokens"),
    "negative temperature": ("/v1/completions", {"prompt": "a", "temperature": -0.5},
                             "temperature"),
    "prompt past the window": ("/v1/completions", {"prompt": "a" * 33}, "prompt"),
    "n past the slots": ("/v1/completions", {"prompt": "a", "n": SLOTS + 1}, "n"),
    "unknown field": ("/v1/completions", {"prompt": "a", "best_guess": True}, "best_guess"),
    "top_p of 0": ("/v1/completions", {"prompt": "a", "top_p": 0}, "top_p"),
    "character outside the vocabulary": ("/v1/completions", {"prompt": "\u2603"}, "prompt"),
    "token id outside the vocabulary": ("/v1/completions", {"prompt": [10**6]}, "prompt"),
    "penalty": ("/v1/completions", {"prompt": "a", "presence_penalty": 0.5}, "presence_penalty"),
    "usage without a stream": ("/v1/completions", {"prompt": "a", "stream_options": {
        "include_usage": True}}, "stream_options"),
    "no messages": ("/v1/chat/completions", {"messages": []}, "messages"),
    "missing prompt": ("/v1/completions", {"prompt": None}, "prompt"),
    "chat message without a role": ("/v1/chat/completions", {"messages": [{"content": "a"}]},
                                    "messages"),
}


@pytest.mark.parametrize("path, body, field", BAD_REQUESTS.values(), ids=BAD_REQUESTS)
def test_a_bad_request_is_a_400_naming_the_field(server, client, path, body, field):
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == field
    assert error["message"]
    assert_still_answers(client)


def test_null_fields_take_their_defaults_as_openais_api_reads_them(server):
    body = {"prompt": "ROMEO:", "seed": 5, "max_tokens": 7}
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "echo": None,
             "logprobs": None, "stop": None, "presence_penalty": None, "user": None}
    plain, with_nulls = post(server, "/v1/completions", body), post(
        server, "/v1/completions", {**body, **nulls})
    assert with_nulls.status_code == 200, with_nulls.text
    assert with_nulls.json()["choices"] == plain.json()["choices"]
    chat = {"messages": [{"role": "user", "content": "a"}], "max_tokens": 3, "temperature": 0}
    response = post(server, "/v1/chat/completions", {**chat, "logprobs": None, "n": None})
    assert response.json()["choices"] == post(server, "/v1/chat/completions", chat).json()[
        "choices"]


@pytest.mark.parametrize("body, forms", [({"prompt": []}, "a string, a list of strings"),
                                         ({"prompt": "a", "stop": ["x"] * 5},
                                          "a list of at most 4 strings")])
def test_a_field_of_several_forms_says_which_it_takes(server, body, forms):
    error = post(server, "/v1/completions", body).json()["error"]
    assert forms in error["message"], error


def test_the_model_is_retrievable_and_a_wrong_method_is_a_request_error(server, client):
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    response = httpx.get(f"{server.url}/v1/completions", headers={
        "Authorization": f"Bearer {KEY}"})
    assert response.status_code == 405
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_the_openai_client_raises_its_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="a", max_tokens=-1)
    assert caught.value.status_code == 400 and caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="a")


def test_a_missing_or_wrong_key_is_a_401(server, client):
    for key in (None, "wrong"):
        response = post(server, "/v1/completions", {"prompt": "a"}, key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == (
            "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200  # open without a key
    assert_still_answers(client)


def open_streams(client, n: int) -> list:
    return [client.completions.create(model="tiny", prompt="a", max_tokens=LONG, seed=i,
                                      stream=True) for i in range(n)]


def wait_until_idle(server, deadline_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while metric(server, "gptzoo_requests_running") or metric(server, "gptzoo_requests_waiting"):
        assert time.monotonic() < deadline, "the slots were not freed"
        time.sleep(0.1)


def test_a_disconnected_stream_frees_its_slot(server, client):
    streams = open_streams(client, SLOTS)
    for stream in streams:
        next(iter(stream))  # each is generating in a slot
    with ThreadPoolExecutor(1) as pool:
        beyond = pool.submit(client.completions.create, model="tiny", prompt="b", max_tokens=3)
        time.sleep(1)
        assert not beyond.done()  # it waits for a slot
        streams[0].close()
        assert beyond.result(timeout=DEADLINE_S).usage.completion_tokens == 3
    for stream in streams[1:]:
        stream.close()
    wait_until_idle(server)


def test_a_client_that_leaves_a_whole_answer_frees_its_slot(server, client):
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/completions", timeout=1, json={
            "prompt": "a", "max_tokens": LONG}, headers={"Authorization": f"Bearer {KEY}"})
    wait_until_idle(server, deadline_s=10)  # not the minutes LONG tokens would take
    assert_still_answers(client)


def test_a_full_queue_is_a_429_and_the_server_goes_on(server, client):
    streams = open_streams(client, SLOTS + QUEUE)
    with pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model="tiny", prompt="c", max_tokens=1)
    assert caught.value.body["code"] == "queue_full"
    for stream in streams:
        stream.close()
    wait_until_idle(server)
    assert_still_answers(client)


@pytest.mark.parametrize("option, fragment", [(("--slots", "0"), "--slots=0"),
                                              (("--max-queue", "-1"), "--max-queue=-1"),
                                              (("--port", "99999"), "--port=99999")])
def test_bad_options_are_one_line_errors(trained_run, option, fragment):
    assert_one_line_error(gptzoo_in_process("serve", "--ckpt", trained_run, *option), fragment)


def test_a_taken_port_is_a_one_line_error(trained_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = gptzoo_in_process("serve", "--ckpt", trained_run, "--port", port)
    assert_one_line_error(result, f"127.0.0.1:{port}", "--port")
