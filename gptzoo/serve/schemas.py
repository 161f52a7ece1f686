"""The request bodies of the OpenAI endpoints, validated as OpenAI's API does.

Types are strict (a string where a number belongs is an error, not converted), `null` stands for
a field's default, and unknown fields are refused, so a setting the server would not apply is
never silently ignored. Fields OpenAI has but gptzoo does not implement are accepted only at their
neutral values.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gptzoo.serve.errors import ApiError
from gptzoo.serve.programs import MAX_LOGPROBS

MAX_STOPS = 4  # OpenAI's limit
INT32 = 2**31

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_left_out(cls, data):
        """A field sent as `null` takes its default, as OpenAI's API reads it."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


class StreamOptions(Strict):
    include_usage: bool = False


class Sampled(Strict):
    """What completions and chat completions share: sampling, stopping, streaming."""

    model: str | None = None
    temperature: Annotated[float, Field(ge=0)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=1)] | None = None  # not OpenAI's: vLLM's and llama.cpp's
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    seed: Annotated[int, Field(ge=-INT32, lt=INT32)] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and unused: it only labels the caller
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias")
    @classmethod
    def _neutral(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} is not supported; leave it out")
        return value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop):
        if stop == "" or (isinstance(stop, list) and "" in stop):
            raise ValueError("a stop string must not be empty")
        return stop

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def check(self, max_n: int) -> None:
        """What one field alone cannot say: raises `ApiError` naming the field."""
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true",
                           "stream_options")
        if self.n > max_n:
            raise ApiError(400, f"n={self.n} is more than this server's {max_n} decode slots; "
                                f"pass n <= {max_n}", "n")
        if self.seed is not None and self.seed + self.n > INT32:
            raise ApiError(400, f"seed={self.seed}: choice i uses seed + i, which must stay "
                                f"below 2**31; pass a smaller seed", "seed")


class CompletionRequest(Sampled):
    """`POST /v1/completions`."""

    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[
        list[TokenIds], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=0)] = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: None = None

    def check(self, max_n: int) -> None:
        super().check(max_n)
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, "best_of other than n is not supported; leave it out",
                           "best_of")

    def prompts(self) -> list[str] | list[list[int]]:
        """A list of texts or a list of token-id lists."""
        prompt = self.prompt
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            return [prompt]
        return prompt


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """A chat message; fields beyond `role`, `content` and `name` reach the template as they are
    (a template may read `tool_calls`, say)."""

    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_dict(self) -> dict:
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        return message


class ChatRequest(Sampled):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=0)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    def check(self, max_n: int) -> None:
        super().check(max_n)
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")

    def token_limit(self, default: int) -> int:
        """`max_completion_tokens`, else `max_tokens`, else `default`."""
        limit = self.max_completion_tokens
        limit = self.max_tokens if limit is None else limit
        return default if limit is None else limit


class TokenizeRequest(Strict):
    """`POST /tokenize` (vLLM's)."""

    prompt: str
    add_special_tokens: Literal[False] = False  # gptzoo's tokenizers add none
    model: str | None = None


class DetokenizeRequest(Strict):
    """`POST /detokenize` (vLLM's)."""

    tokens: list[Annotated[int, Field(ge=0)]]
    model: str | None = None
