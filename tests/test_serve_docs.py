"""docs/serving.md's examples work as written, against a live server
(tests/live_server.py): its ```python blocks run in order, and every curl command's request, read
from its command line, is answered. Only the server's address, the model's name and the key
differ from the page: the test serves its tiny run, under an API key."""

import json
import shlex

import httpx
import live_server
from conftest import ROOT
from live_server import KEY
from test_docs_examples import python_blocks

server = live_server.server  # a live server for this module

PAGE = ROOT / "docs" / "serving.md"
DOCS_URL, DOCS_MODEL = "http://127.0.0.1:8000", "char_shakespeare"


def as_served(text: str, server) -> str:
    return (text.replace(DOCS_URL, server.url).replace(f'"{DOCS_MODEL}"', '"tiny"')
            .replace('api_key="none"', f'api_key="{KEY}"'))


def test_the_python_examples_run(server, capsys):
    blocks = python_blocks(PAGE)
    assert len(blocks) >= 5
    namespace = {}
    for line, code in blocks:
        exec(compile("\n" * line + as_served(code, server), str(PAGE), "exec"), namespace)
    assert float(capsys.readouterr().out.splitlines()[-1]) < 0  # the scored text's log-likelihood


def curl_commands() -> list[str]:
    """The page's curl commands, each on one line."""
    text = PAGE.read_text()
    blocks = [b.split("```")[0] for b in text.split("```bash\n")[1:]]
    lines = "\n".join(blocks).replace("\\\n", " ")
    return [line for line in lines.splitlines() if line.startswith("curl ")]


def request_of(command: str) -> tuple[str, str, dict, bytes | None]:
    """(method, url, headers, body) of a curl command using -H, -d and -N only."""
    args, headers, body, url = iter(shlex.split(command)[1:]), {}, None, None
    for arg in args:
        if arg == "-H":
            name, value = next(args).split(": ", 1)
            headers[name] = value
        elif arg == "-d":
            body = next(args).encode()
        elif arg.startswith("http"):
            url = arg
        else:
            assert arg == "-N", f"a curl option this test does not read: {arg}"
    return ("GET" if body is None else "POST"), url, headers, body


def test_the_curl_examples_are_answered(server):
    commands = curl_commands()
    assert len(commands) == 5
    for command in commands:
        method, url, headers, body = request_of(as_served(command, server))
        response = httpx.request(method, url, content=body, timeout=60,
                                 headers={**headers, "Authorization": f"Bearer {KEY}"})
        assert response.status_code == 200, (command, response.text)
        if body is not None and json.loads(body).get("stream"):
            assert response.text.endswith("data: [DONE]\n\n")
