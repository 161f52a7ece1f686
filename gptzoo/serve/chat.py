"""Chat templates: the messages of a chat request rendered into the prompt text.

An imported model's template (its `chat_template.jinja`, or the `chat_template` of its
`tokenizer_config.json`) is rendered as transformers' `apply_chat_template` renders it: Jinja's
`ImmutableSandboxedEnvironment` with `trim_blocks` and `lstrip_blocks`, loop controls, a `tojson`
that does not escape HTML, `raise_exception`, `strftime_now`, the special tokens by name
(`bos_token`, `eos_token`, ...) and `add_generation_prompt=True`. A template comes from a
model's files, so it runs in the sandbox, which refuses access to Python's internals.

A run without a template (a model trained here) uses `PLAIN_TEMPLATE`: each message as its role
in capitals, a colon, a newline, its content and a blank line, as speeches are set out in tiny
Shakespeare; then `ASSISTANT:` and a newline for the reply.
"""

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gptzoo.errors import GptzooError
from gptzoo.serve.errors import ApiError

PLAIN_TEMPLATE = ("{% for message in messages %}{{ message['role'] | upper }}:\n"
                  "{{ message['content'] }}\n\n{% endfor %}"
                  "{% if add_generation_prompt %}ASSISTANT:\n{% endif %}")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                  "mask_token")


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`, transformers' marker of the assistant's text
    (for training masks): its body, unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(form: str) -> str:
    return datetime.now().strftime(form)


class ChatTemplate:
    """A compiled chat template.

    **Arguments:**

    - `source`: the template's Jinja text.
    - `special_tokens`: the special tokens' texts by name (`bos_token`, ...), which templates
        read as variables.
    - `origin`: where the template came from, for messages.
    """

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None,
                 origin: str = "the plain template"):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_Generation, loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise GptzooError(f"the chat template of {origin} does not parse (line {e.lineno}: "
                              f"{e.message}); fix it or pass --chat-template FILE") from e
        self.special_tokens, self.origin = dict(special_tokens or {}), origin

    def render(self, messages: list[dict]) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=True,
                                        **self.special_tokens)
        except jinja2.TemplateError as e:
            raise ApiError(400, f"the chat template refused these messages: {e}",
                           "messages") from e

    @classmethod
    def for_run(cls, run_dir: str | Path, path: str | Path | None = None) -> "ChatTemplate":
        """The template of `path`, else the run's own, else `PLAIN_TEMPLATE`."""
        run_dir = Path(run_dir)
        config = _read_json(run_dir / "tokenizer_config.json")
        special = {name: _token_text(config[name]) for name in SPECIAL_TOKENS
                   if config.get(name) is not None}
        if path is not None:
            if not Path(path).is_file():
                raise GptzooError(f"--chat-template {path} does not exist; pass a Jinja "
                                  "template file")
            return cls(Path(path).read_text(encoding="utf-8"), special, str(path))
        if (run_dir / "chat_template.jinja").is_file():
            source = (run_dir / "chat_template.jinja").read_text(encoding="utf-8")
            return cls(source, special, str(run_dir / "chat_template.jinja"))
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if source:
            return cls(source, special, str(run_dir / "tokenizer_config.json"))
        return cls(PLAIN_TEMPLATE)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptzooError(f"{path} is not valid JSON ({e}); fix or remove it") from e


def _token_text(token) -> str:
    """A special token as tokenizer_config.json writes it: a string or `{"content": ...}`."""
    return token["content"] if isinstance(token, dict) else str(token)
