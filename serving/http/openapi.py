"""OpenAPI pieces for routes that parse their bodies by hand.

The routes read raw bodies (strict parsing, OpenAI error bodies), so FastAPI cannot infer
their request schemas: `json_body` names a protocol model in `openapi_extra`, `errors` lists
the OpenAI-shaped error responses, and `install_openapi` adds the named request models to the
document's components.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

REF = "#/components/schemas/{model}"

# Request-field schemas for protocol.py (`WithJsonSchema`: they change the document, never
# validation). Each says what the field's validator enforces, so that every schema-valid
# request parses; server limits (n, top_k, prompts, images, labels) are added by the app.
_TEXT = {"type": "string", "minLength": 1}
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
PROMPT = {
    "anyOf": [
        _TEXT,
        {"type": "array", "items": _TEXT, "minItems": 1},
        _IDS,
        {"type": "array", "items": _IDS, "minItems": 1},
    ]
}


def stop(max_stops: int) -> dict[str, Any]:
    return {
        "anyOf": [
            _TEXT,
            {"type": "array", "items": _TEXT, "maxItems": max_stops},
            {"type": "null"},
        ]
    }


# best_of == n cannot be said in JSON Schema: null is the value that always works.
BEST_OF = {"type": "null", "description": "Only null, or a value equal to `n`."}
SUFFIX = {"type": "null", "description": "Not supported: only null."}
LOGIT_BIAS = {
    "anyOf": [{"type": "object", "maxProperties": 0}, {"type": "null"}],
    "description": "Not supported: only an empty object.",
}
# max_tokens 0 needs echo; stream_options needs stream (each as "this, or else that": a
# generator handles that better than if/then, which needs a `not`).
COMPLETION_RULES = {
    "allOf": [
        {
            "anyOf": [
                {"required": ["echo"], "properties": {"echo": {"const": True}}},
                {"properties": {"max_tokens": {"anyOf": [{"minimum": 1}, {"type": "null"}]}}},
            ]
        },
        {
            "anyOf": [
                {"required": ["stream"], "properties": {"stream": {"const": True}}},
                {"properties": {"stream_options": {"type": "null"}}},
            ]
        },
    ]
}
LABELS = {  # non-blank and unique, as routes_classify checks them
    "anyOf": [
        {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "pattern": r"\S"},
            "minItems": 1,
            "uniqueItems": True,
        },
        {"type": "null"},
    ]
}
# Relative to the expert store: no leading / \ or ~, no drive letter, no `..`, no NUL.
STORE_PATH = r"^(?![/\\~])(?![\s\S]:)(?![\s\S]*(?:^|[/\\])\.\.(?:[/\\]|$))[^\x00]*$"

_DESCRIPTIONS = {
    400: "Invalid request (OpenAI error body; `param` names the field)",
    401: "Missing or incorrect bearer token",
    404: "Unknown model, or the resource is not served here",
    409: "Conflicts with the expert pool's state",
    413: "Request body or image too large",
    415: "Unsupported content type",
    422: "The expert set cannot be loaded",
    500: "Unexpected server error (details only in the server log)",
    503: "Overloaded or unavailable; retry after `Retry-After` seconds",
    504: "The request did not finish within the server's timeout",
}

_HEADERS = {  # sent with every answer of that status (serving.http.errors)
    401: ("WWW-Authenticate", "`Bearer`"),
    503: ("Retry-After", "Seconds to wait before retrying"),
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body: every non-2xx answer of this server has this shape."""

    error: ErrorDetail


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for the given error statuses (plus 413 and 500, which any route can give)."""
    codes = sorted({*statuses, 413, 500})
    responses: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        responses[code] = {"model": ErrorResponse, "description": _DESCRIPTIONS[code]}
        if code in _HEADERS:
            name, description = _HEADERS[code]
            header = {"required": True, "description": description, "schema": {"type": "string"}}
            responses[code]["headers"] = {name: header}
    return responses


def ok(model: type[BaseModel], *, events: str | None = None) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a 200 answered with `model` as JSON; `events` (what each event's data
    is): or, when the request asks to stream, as server-sent events."""
    answer: dict[str, Any] = {"model": model, "description": f"A {model.__name__}"}
    if events is not None:
        answer["description"] += f"; streamed: server-sent events, each `data:` {events}"
        # Before OpenAPI 3.2, an event stream's `schema` describes one event.
        event = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
        answer["content"] = {"text/event-stream": {"schema": event}}
    return {200: answer}


def json_body(*models: type[BaseModel], multipart: dict[str, Any] | None = None) -> dict:
    """`openapi_extra` declaring a required request body of one of `models` (JSON), and
    optionally a multipart/form-data schema."""
    refs = [{"$ref": REF.format(model=model.__name__)} for model in models]
    content: dict[str, Any] = {
        "application/json": {"schema": refs[0] if len(refs) == 1 else {"anyOf": refs}}
    }
    if multipart is not None:
        content["multipart/form-data"] = {"schema": multipart}
    return {"requestBody": {"required": True, "content": content}}


def install_openapi(
    app: FastAPI,
    request_models: list[type[BaseModel]],
    limits: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Generate the document once, with `request_models` (and their $defs) as components;
    `limits` then writes the server's limits into the document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for model in request_models:
                schema = model.model_json_schema(ref_template=REF)
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
            # Its pieces may be shared (the constants above, routes' multipart schemas):
            # this app's limits are written into its own copy.
            document = copy.deepcopy(document)
            _drop_fastapi_validation(document)
            _override_parameters(document)
            if limits is not None:
                limits(document)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _drop_fastapi_validation(document: dict[str, Any]) -> None:
    """FastAPI documents a 422 `HTTPValidationError` for routes with parameters; this server
    answers validation failures with a 400 OpenAI error body instead, so drop it."""
    fastapi_422 = {"$ref": REF.format(model="HTTPValidationError")}
    for item in document.get("paths", {}).values():
        for operation in item.values():
            response = operation.get("responses", {}).get("422", {})
            if response.get("content", {}).get("application/json", {}).get("schema") == fastapi_422:
                del operation["responses"]["422"]
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def _override_parameters(document: dict[str, Any]) -> None:
    """A parameter in a route's `openapi_extra` replaces the one FastAPI generated with the
    same name and location (FastAPI appends both): the handler's own checks (after the
    token check) are documented without validating the parameter before them."""
    for item in document.get("paths", {}).values():
        for operation in item.values():
            merged: dict[tuple[str, str], dict[str, Any]] = {}
            for parameter in operation.get("parameters", []):
                merged[(parameter["in"], parameter["name"])] = parameter
            if merged:
                operation["parameters"] = list(merged.values())
