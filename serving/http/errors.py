"""Error types -> HTTP status + OpenAI error body.

Every error a client can cause is an `ApiError` subclass; its JSON body is OpenAI's
`{"error": {"message", "type", "param", "code"}}`. `install_error_handlers(app)` maps these,
request-validation failures, unknown routes and any unexpected exception (500, generic
message, traceback only in the log) onto that body.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class ApiError(Exception):
    """An error with an HTTP status and an OpenAI-shaped body."""

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = SERVER_ERROR
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers or None)


class BadRequest(ApiError):
    status = 400
    error_type = INVALID_REQUEST


class Unauthorized(ApiError):
    status = 401
    error_type = INVALID_REQUEST
    default_code = "invalid_api_key"

    def __init__(self, message: str, **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(message, **kwargs)


class NotFound(ApiError):
    status = 404
    error_type = INVALID_REQUEST


class ModelNotFound(NotFound):
    default_code = "model_not_found"

    def __init__(self, model: str, served: Sequence[str]) -> None:
        names = ", ".join(served) or "none"
        super().__init__(
            f"The model `{model}` does not exist (served here: {names}).", param="model"
        )


class PayloadTooLarge(ApiError):
    status = 413
    error_type = INVALID_REQUEST
    default_code = "payload_too_large"


class UnsupportedMedia(ApiError):
    status = 415
    error_type = INVALID_REQUEST
    default_code = "unsupported_media_type"


class Unprocessable(ApiError):
    status = 422
    error_type = INVALID_REQUEST


class Overloaded(ApiError):
    """The server cannot take the request now; the client should retry after a pause."""

    status = 503
    error_type = SERVER_ERROR
    default_code = "overloaded"

    def __init__(
        self,
        message: str = "The server is overloaded; retry later.",
        *,
        retry_after: int = 1,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("headers", {"Retry-After": str(retry_after)})
        super().__init__(message, **kwargs)


class ServiceUnavailable(Overloaded):
    """The model replica serving the request went away (crashed, killed, node lost).

    Retryable: another replica, or a restarted one, can take the request.
    """

    default_code = "server_unavailable"


class RequestTimeout(ApiError):
    """The engine did not finish within the server's request timeout.

    504 rather than 408: 408 means the *client* was too slow to send its request.
    """

    status = 504
    error_type = "timeout_error"
    default_code = "request_timeout"


class ContextLengthExceeded(BadRequest):
    default_code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, max_tokens: int, max_context: int) -> None:
        super().__init__(
            f"This model's maximum context length is {max_context} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
            f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_context = max_context


class ExpertLoadFailed(Unprocessable):
    """An expert set that cannot be loaded (invalid, wrong base model, too large ...)."""

    default_code = "expert_load_failed"


class ExpertConflict(ApiError):
    """An expert set that clashes with the pool's state (name taken, load in flight)."""

    status = 409
    error_type = INVALID_REQUEST
    default_code = "expert_conflict"


def _param(loc: Sequence[str | int]) -> str | None:
    """`("prompt", 0)` -> `"prompt[0]"`: OpenAI names the offending parameter."""
    parts = list(loc)
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def validation_error(errors: Sequence[Mapping[str, Any]], *, located: bool = False) -> BadRequest:
    """A pydantic error list as one 400 naming the first offending parameter.

    `located`: FastAPI's errors, whose locations start with "body", "query", "path" ...
    """
    if not errors:
        return BadRequest("Invalid request.")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return BadRequest(
            "We could not parse the JSON body of your request. The body must be valid JSON.",
            code="invalid_json",
        )
    loc = tuple(first.get("loc", ()))
    param = _param(loc[1:] if located else loc)
    message = str(first.get("msg", "invalid value"))
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return BadRequest(message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through the OpenAI error body."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        if exc.status >= 500:
            logger.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc)
        return exc.response()

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_error(exc.errors(), located=True).response()

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        error = ApiError(str(exc.detail), headers=exc.headers)
        error_type = INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR
        body = error.body()
        body["error"]["type"] = error_type
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return ApiError("The server had an error while processing your request.").response()

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
