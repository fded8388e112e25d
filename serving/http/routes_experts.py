"""`GET/POST/DELETE /v1/experts`: list, hot-load and retire expert sets (admin only).

Every request needs `Authorization: Bearer <admin token>`; the token check comes before
anything else so an unauthenticated caller learns nothing. Loading takes JSON
`{"path": ..., "model": ...}` (a path inside the configured expert store) or a
multipart/form-data upload (`file` part, optional `model` field). The admin's answers are
returned as JSON as they are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from serving.http.backend import ExpertAdmin
from serving.http.errors import BadRequest, NotFound
from serving.http.openapi import errors, json_body
from serving.http.protocol import ExpertLoadRequest, parse_request

if TYPE_CHECKING:
    from serving.http.api import AppState

MAX_NAME_CHARS = 200
_MULTIPART = {
    "type": "object",
    "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary"}, "model": {"type": "string"}},
    "additionalProperties": False,  # a few more fields pass unread; past that, a 400
}
_NAME = {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS}


def _name_in(location: str) -> dict:
    """`openapi_extra` documenting the `name` parameter as `retire` checks it."""
    return {"parameters": [{"name": "name", "in": location, "required": True, "schema": _NAME}]}


def router(state: AppState) -> APIRouter:
    routes = APIRouter()

    def admin(request: Request) -> ExpertAdmin:
        state.require_admin(request)
        if state.admin is None:
            raise NotFound("Expert administration is not available on this server.")
        return state.admin

    @routes.get("/v1/experts", response_model=None, responses=errors(401, 404, 503))
    async def list_sets(request: Request) -> JSONResponse:
        return JSONResponse(jsonable_encoder(await admin(request).list_sets()))

    @routes.post(
        "/v1/experts",
        response_model=None,
        responses=errors(400, 401, 404, 409, 415, 422, 503),
        openapi_extra=json_body(ExpertLoadRequest, multipart=_MULTIPART),
    )
    async def load_set(request: Request) -> JSONResponse:
        backend = admin(request)
        path: str | None = None
        upload: bytes | None = None
        if state.media_type(request) == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=4)
            part = form.get("file")
            if not isinstance(part, UploadFile):
                raise BadRequest("Upload the expert set as the `file` part.", param="file")
            upload = await part.read()
            model = form.get("model")
            model = model if isinstance(model, str) and model else None
        else:
            req = parse_request(
                ExpertLoadRequest, await state.read_json(request), state.settings.limits()
            )
            path, model = req.path, req.model
        if model is not None and model not in state.model_names:
            raise NotFound(
                f"The model `{model}` is not served here.", param="model", code="model_not_found"
            )
        return JSONResponse(jsonable_encoder(await backend.load_set(path, upload, model)))

    async def retire(request: Request, name: str) -> JSONResponse:
        backend = admin(request)
        if not name or len(name) > MAX_NAME_CHARS:
            raise BadRequest("Give the name of a loaded expert set.", param="name")
        return JSONResponse(jsonable_encoder(await backend.retire_set(name)))

    @routes.delete(
        "/v1/experts/{name}",
        response_model=None,
        responses=errors(400, 401, 404, 503),
        openapi_extra=_name_in("path"),
    )
    async def retire_by_path(request: Request, name: str) -> JSONResponse:
        return await retire(request, name)

    @routes.delete(
        "/v1/experts",
        response_model=None,
        responses=errors(400, 401, 404, 503),
        openapi_extra=_name_in("query"),
    )
    async def retire_by_query(request: Request) -> JSONResponse:
        return await retire(request, request.query_params.get("name", ""))

    return routes
