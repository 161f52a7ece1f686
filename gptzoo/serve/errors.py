"""OpenAI's error object, `{"error": {"message", "type", "param", "code"}}`, for every failure
a request can meet; a bad request never reaches the engine."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

# What a field of several accepted forms must be, where no single form's complaint says it.
_FORMS = {"prompt": "a string, a list of strings, a list of token ids or a list of such lists",
          "stop": "a string or a list of at most 4 strings"}


class ApiError(Exception):
    """A request the server refuses.

    **Arguments:**

    - `status`: the HTTP status.
    - `message`: what is wrong and what to do instead.
    - `param`: the request field concerned, or None.
    - `code`: OpenAI's short code for the error, or None.
    """

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code)


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    kind = ("rate_limit_error" if status == 429 else
            "invalid_request_error" if 400 <= status < 500 else "server_error")
    body = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status)


def _field(loc: tuple) -> str | None:
    """The top-level request field an error's location names (`("body", "max_tokens")`)."""
    return loc[1] if len(loc) > 1 and isinstance(loc[1], str) else None


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    error = exc.errors()[0]
    if error["type"] == "json_invalid":
        return error_response(400, f"the body is not valid JSON ({error['ctx']['error']}); "
                                   "send a JSON object")
    field = _field(tuple(error["loc"]))
    if field is None:
        return error_response(400, "the body must be a JSON object with the request's fields "
                                   "(Content-Type: application/json)")
    message = error["msg"].removeprefix("Value error, ")
    forms = _FORMS.get(field)
    if forms and sum(_field(tuple(e["loc"])) == field for e in exc.errors()) > 1:
        message = f"must be {forms}"  # every form refused it: pydantic names only the first
    return error_response(400, f"{field}: {message}", field)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
