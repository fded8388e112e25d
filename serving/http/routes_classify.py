"""`POST /classify`: CLIP zero-shot classification of PNG/JPEG images.

Two request shapes: JSON (`images` as base64 strings, a data-URL prefix allowed) or
multipart/form-data (`images` file parts, `labels` repeated or one JSON list, optional
`top_k`, `model` and `mora` as a JSON object). Images are decoded off the event loop, only
as PNG or JPEG, and refused before decoding when their pixel count exceeds the server's
limit (a small file can declare a huge canvas: a decompression bomb).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from serving.http.errors import BadRequest, PayloadTooLarge, RequestTimeout
from serving.http.openapi import errors, json_body, ok
from serving.http.protocol import (
    ClassifyRequest,
    parse_request,
)
from serving.http.responses import (
    ClassifyResponse,
    ImageLabels,
    LabelScore,
    MoraInfo,
)

if TYPE_CHECKING:
    from serving.http.api import ApiSettings, AppState

IMAGE_FORMATS = ("PNG", "JPEG")
_DATA_URL = re.compile(r"^data:[\w.+/-]*(;[\w=.+-]+)*;base64,", re.IGNORECASE)
_FORM_FIELDS = 16  # non-file fields besides repeated labels
_MULTIPART = {
    "type": "object",
    "required": ["images"],
    "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "labels": {"type": "array", "items": {"type": "string"}},
        "top_k": {"type": "integer", "minimum": 1},
        "model": {"type": "string"},
        "mora": {"type": "string", "description": "MoraOptions as a JSON object"},
    },
    "additionalProperties": False,  # a few more fields pass unread; past that, a 400
}


def router(state: AppState) -> APIRouter:
    routes = APIRouter()

    @routes.post(
        "/classify",
        response_model=None,
        responses={**ok(ClassifyResponse), **errors(400, 401, 404, 415, 503, 504)},
        openapi_extra=json_body(ClassifyRequest, multipart=_MULTIPART),
    )
    async def classify(request: Request) -> JSONResponse:
        state.require_api(request)
        settings = state.settings
        if state.media_type(request) == "multipart/form-data":
            req, blobs = await _read_form(request, settings)
        else:
            req = parse_request(ClassifyRequest, await state.read_json(request), settings.limits())
            _check_count(len(req.images), settings)
            blobs = list(req.images)
        clip = state.resolve_clip(req.model)
        labels = _check_labels(req.labels, settings)
        images = await run_in_threadpool(_load_all, blobs, settings.max_image_pixels)
        mora = req.mora.to_overrides() if req.mora is not None else None
        try:
            result = await asyncio.wait_for(
                clip.classify(images, labels, mora), settings.request_timeout_s
            )
        except TimeoutError:
            raise RequestTimeout(
                f"Classification did not finish within {settings.request_timeout_s:g} s."
            ) from None
        rows = []
        for index, probs in enumerate(result.probabilities):
            ranked = sorted(zip(result.labels, probs, strict=True), key=lambda lp: -lp[1])
            ranked = ranked[: req.top_k] if req.top_k else ranked
            scores = [LabelScore(label=label, probability=p) for label, p in ranked]
            rows.append(ImageLabels(index=index, labels=scores))
        response = ClassifyResponse(
            id=f"clf-{uuid.uuid4().hex}",
            model=clip.model_name,
            data=rows,
            mora=MoraInfo.from_routing(result.pool_version, result.routing),
        )
        return JSONResponse(response.model_dump(mode="json"))

    return routes


def _check_count(count: int, settings: ApiSettings) -> None:
    if count > settings.max_images:
        raise BadRequest(
            f"Too many images: {count} (at most {settings.max_images} per request).",
            param="images",
            code="too_many_images",
        )


def _check_labels(labels: list[str] | None, settings: ApiSettings) -> list[str] | None:
    if labels is None:
        return None
    if not labels or len(labels) > settings.max_labels:
        raise BadRequest(f"Give 1 to {settings.max_labels} labels.", param="labels")
    for i, label in enumerate(labels):
        if not label.strip() or len(label) > settings.max_label_chars:
            raise BadRequest(
                f"Labels must be non-blank and at most {settings.max_label_chars} characters.",
                param=f"labels[{i}]",
            )
    if len(set(labels)) != len(labels):
        raise BadRequest("Labels must be unique.", param="labels")
    return labels


def _b64(text: str, index: int) -> bytes:
    payload = _DATA_URL.sub("", text.strip(), count=1)
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("Not valid base64 image data.", param=f"images[{index}]") from None


async def _read_form(
    request: Request, settings: ApiSettings
) -> tuple[ClassifyRequest, list[bytes | str]]:
    form = await request.form(
        max_files=settings.max_images + 1, max_fields=settings.max_labels + _FORM_FIELDS
    )
    files = form.getlist("images")
    if not all(isinstance(item, UploadFile) for item in files):
        raise BadRequest("`images` parts must be file uploads.", param="images")
    _check_count(len(files), settings)
    labels: Any = [str(value) for value in form.getlist("labels")] or None
    if labels and len(labels) == 1 and labels[0].lstrip().startswith("["):
        labels = _json_field(labels[0], "labels")
    fields: dict[str, Any] = {"images": ["upload"] * len(files), "labels": labels}
    for name in ("model", "top_k", "mora"):
        value = form.get(name)
        if isinstance(value, str):
            fields[name] = _json_field(value, name) if name != "model" else value
    req = parse_request(ClassifyRequest, json.dumps(fields).encode(), settings.limits())
    blobs = [await item.read() for item in files]  # type: ignore[union-attr]
    return req, blobs


def _json_field(value: str, name: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        raise BadRequest(f"The form field `{name}` must be valid JSON.", param=name) from None


def _load_all(blobs: list[bytes | str], max_pixels: int) -> list[Image.Image]:
    """Decode every image (base64 text or raw bytes); runs in a worker thread."""
    return [
        load_image(_b64(blob, index) if isinstance(blob, str) else blob, max_pixels, index)
        for index, blob in enumerate(blobs)
    ]


def load_image(blob: bytes, max_pixels: int, index: int = 0) -> Image.Image:
    """A PNG/JPEG as RGB, checked (size, integrity) before its pixels are decoded."""
    param = f"images[{index}]"
    try:
        with Image.open(io.BytesIO(blob), formats=IMAGE_FORMATS) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"Image {index} is {width}x{height} pixels, above the limit of "
                    f"{max_pixels} pixels.",
                    param=param,
                    code="image_too_large",
                )
            probe.verify()
        with Image.open(io.BytesIO(blob), formats=IMAGE_FORMATS) as image:
            image.load()
            return image.convert("RGB")
    except Image.DecompressionBombError:
        raise PayloadTooLarge(
            f"Image {index} is too large to decode.", param=param, code="image_too_large"
        ) from None
    except UnidentifiedImageError:
        raise BadRequest(
            f"Image {index} is not a valid PNG or JPEG image.", param=param, code="invalid_image"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadRequest(
            f"Image {index} is corrupt or truncated ({exc}).", param=param, code="invalid_image"
        ) from None
