"""OpenAPI pieces for routes that parse their bodies by hand.

The routes read raw bodies (strict parsing, OpenAI error bodies), so FastAPI cannot infer
their request schemas: `json_body` names a protocol model in `openapi_extra`, `errors` lists
the OpenAI-shaped error responses, and `install_openapi` adds the named request models to the
document's components.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

REF = "#/components/schemas/{model}"

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
    return {code: {"model": ErrorResponse, "description": _DESCRIPTIONS[code]} for code in codes}


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


def install_openapi(app: FastAPI, request_models: list[type[BaseModel]]) -> None:
    """Generate the document once, with `request_models` (and their $defs) as components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for model in request_models:
                schema = model.model_json_schema(ref_template=REF)
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
            _drop_fastapi_validation(document)
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
