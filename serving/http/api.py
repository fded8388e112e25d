"""The HTTP surface as a plain FastAPI app over injectable backends (no Ray in here).

`create_app(lm, clip, admin, settings)` serves `/v1/completions`, `/v1/models`,
`/classify`, `/v1/experts` and `/health`; the Ray Serve ingress wraps the returned app and
tests drive it with fakes. Any backend may be None: its routes then answer 404.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match

from serving.config import LimitSettings, RoutingSettings, ServerConfig
from serving.http import routes_classify, routes_completions, routes_experts
from serving.http.backend import ClipBackend, ExpertAdmin, LMBackend, MetricsHook, NullMetrics
from serving.http.errors import (
    INVALID_REQUEST,
    ApiError,
    ModelNotFound,
    NotFound,
    Overloaded,
    Unauthorized,
    UnsupportedMedia,
    install_error_handlers,
)
from serving.http.middleware import AnnounceBound, BodyLimit, RequestMetrics
from serving.http.openapi import errors, install_openapi
from serving.http.protocol import (
    ClassifyRequest,
    CompletionRequest,
    ExpertLoadRequest,
    Limits,
)
from serving.http.responses import (
    HealthResponse,
    ModelCard,
    ModelList,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
# /health waits this long for a backend's readiness; past it the model counts as not ready.
READY_TIMEOUT_S = 1.5


_LIMITS = LimitSettings()  # the defaults below are the server config's, never restated


@dataclass(frozen=True)
class ApiSettings:
    """What the HTTP surface enforces. The limits mean what serving/config.py's LimitSettings
    says and default to its defaults; a served app gets them from its config
    (`ApiSettings.from_config`)."""

    admin_token: str | None = None  # None: every admin request is refused (401)
    api_token: str | None = None  # None: inference routes are open
    max_n: int = _LIMITS.max_n
    max_top_k: int = RoutingSettings().max_top_k  # largest per-request `mora.top_k`
    max_prompts: int = _LIMITS.max_prompts
    max_images: int = _LIMITS.max_images
    max_labels: int = _LIMITS.max_labels
    max_label_chars: int = _LIMITS.max_label_chars
    max_image_pixels: int = _LIMITS.max_image_pixels
    max_body_bytes: int = _LIMITS.max_body_bytes
    # /v1/completions only: a huge body is refused before it is read or parsed.
    max_completion_body_bytes: int = _LIMITS.max_completion_body_bytes
    max_prompt_chars_per_token: int = _LIMITS.max_prompt_chars_per_token
    request_timeout_s: float = _LIMITS.request_timeout_s
    # Completions in flight through this app (None: unbounded). Past it a request is refused
    # with a 503 as it arrives, before its body is read: the model replicas' own queues
    # would refuse it too, but only after parsing, tokenising and a trip through Ray.
    max_inflight_completions: int | None = _LIMITS.max_inflight_completions
    # Name that bound on completion responses, for a gate in the proxy in front.
    refuse_at_proxy: bool = _LIMITS.refuse_at_proxy
    served_model_names: tuple[str, ...] = ()  # public LM names; default (lm.model_name,)

    @classmethod
    def from_config(cls, cfg: ServerConfig) -> ApiSettings:
        """The settings a server with this config enforces (secrets as `cfg` holds them)."""
        limits = cfg.limits
        return cls(
            admin_token=cfg.admin_token,
            api_token=cfg.api_token,
            max_n=limits.max_n,
            max_top_k=cfg.lm.routing.max_top_k,
            max_prompts=limits.max_prompts,
            max_images=limits.max_images,
            max_labels=limits.max_labels,
            max_label_chars=limits.max_label_chars,
            max_image_pixels=limits.max_image_pixels,
            max_body_bytes=limits.max_body_bytes,
            max_completion_body_bytes=limits.max_completion_body_bytes,
            max_prompt_chars_per_token=limits.max_prompt_chars_per_token,
            request_timeout_s=limits.request_timeout_s,
            max_inflight_completions=cfg.inflight_bound(),
            refuse_at_proxy=limits.refuse_at_proxy,
            served_model_names=(cfg.lm.served_name,) if cfg.lm.enabled else (),
        )

    @property
    def announced_bound(self) -> int | None:
        """The bound completion responses name for a gate in the proxy (None: no header)."""
        return self.max_inflight_completions if self.refuse_at_proxy else None

    def limits(self) -> Limits:
        return Limits(max_n=self.max_n, max_top_k=self.max_top_k, max_prompts=self.max_prompts)


@dataclass
class AppState:
    """What the routes share: backends, settings, metrics and the checks every route makes."""

    lm: LMBackend | None
    clip: ClipBackend | None
    admin: ExpertAdmin | None
    settings: ApiSettings
    metrics: MetricsHook = field(default_factory=NullMetrics)
    params_cls: Any = None  # mora_runtime.engine.params.SamplingParams (or a test double)
    _inflight: int = field(default=0, init=False)  # completions admitted, not yet closed

    @property
    def lm_names(self) -> tuple[str, ...]:
        if self.lm is None:
            return ()
        return self.settings.served_model_names or (self.lm.model_name,)

    @property
    def model_names(self) -> tuple[str, ...]:
        return self.lm_names + ((self.clip.model_name,) if self.clip is not None else ())

    def admit_completion(self) -> Callable[[], None]:
        """Count one completion in flight, or refuse it (503) when the bound is reached;
        returns the idempotent release."""
        limit = self.settings.max_inflight_completions
        if limit is not None and self._inflight >= limit:
            raise Overloaded(
                f"The server is at capacity ({limit} completions in flight); retry shortly."
            )
        self._inflight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._inflight -= 1

        return release

    def resolve_lm(self, model: str) -> LMBackend:
        if self.lm is None or model not in self.lm_names:
            raise ModelNotFound(model, self.model_names)
        return self.lm

    def resolve_clip(self, model: str | None) -> ClipBackend:
        if self.clip is None:
            raise NotFound("No image classification model is served here.", code="no_clip_model")
        if model is not None and model != self.clip.model_name:
            raise ModelNotFound(model, (self.clip.model_name,))
        return self.clip

    def require_api(self, request: Request) -> None:
        expected = self.settings.api_token
        if expected is not None and not _bearer_matches(request, expected):
            raise Unauthorized("Missing or incorrect API key (Authorization: Bearer <key>).")

    def require_admin(self, request: Request) -> None:
        expected = self.settings.admin_token
        if expected is None:
            logger.warning(
                "refused %s %s: the admin API is disabled because no admin token is configured",
                request.method,
                request.url.path,
            )
            raise Unauthorized("The admin API is disabled: no admin token is configured.")
        if not _bearer_matches(request, expected):
            raise Unauthorized("Missing or incorrect admin token (Authorization: Bearer <t>).")

    @staticmethod
    def media_type(request: Request) -> str:
        """The request's media type, lower case; a missing header counts as JSON."""
        content_type = request.headers.get("content-type", "application/json")
        return content_type.split(";", 1)[0].strip().lower()

    async def read_json(self, request: Request) -> bytes:
        """The raw body of a JSON request (parsed later, strictly, by protocol models)."""
        if self.media_type(request) not in ("application/json", ""):
            raise UnsupportedMedia(
                f"Expected application/json, got {request.headers.get('content-type')}."
            )
        return await request.body()


def _bearer_matches(request: Request, expected: str) -> bool:
    return bearer_matches(request.headers.get("authorization", ""), expected)


def bearer_matches(authorization: str, expected: str) -> bool:
    """Whether an Authorization header's value is `Bearer <expected>` (constant time)."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), expected.encode())


def create_app(
    lm: LMBackend | None,
    clip: ClipBackend | None,
    admin: ExpertAdmin | None,
    settings: ApiSettings,
    *,
    metrics: MetricsHook | None = None,
    params_cls: Any = None,
) -> FastAPI:
    """The FastAPI app. `params_cls` builds engine sampling parameters; default
    `mora_runtime.engine.params.SamplingParams` (imported only when an LM is served)."""
    if lm is not None and params_cls is None:
        from mora_runtime.engine.params import SamplingParams

        params_cls = SamplingParams
    state = AppState(lm, clip, admin, settings, metrics or NullMetrics(), params_cls)
    if settings.admin_token is None:
        logger.warning("admin API disabled: no admin token configured (every request gets 401)")
    app = FastAPI(title="MoRA Serve", version="0.1.0")
    app.state.mora = state
    install_error_handlers(app)
    install_openapi(
        app, [CompletionRequest, ClassifyRequest, ExpertLoadRequest], _document_limits(state)
    )
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_body_bytes,
        per_path={"/v1/completions": settings.max_completion_body_bytes},
    )
    app.add_middleware(RequestMetrics, metrics=state.metrics)
    if settings.announced_bound is not None:
        app.add_middleware(AnnounceBound, bound=settings.announced_bound)
    routers = [
        _misc_router(state),
        routes_completions.router(state),
        routes_classify.router(state),
        routes_experts.router(state),
    ]
    for router in routers:
        app.include_router(router)
    routes = [*app.routes, *(route for router in routers for route in router.routes)]
    app.add_exception_handler(405, _method_not_allowed(routes))
    return app


def _misc_router(state: AppState) -> APIRouter:
    routes = APIRouter()

    @routes.get("/v1/models", responses=errors(401))
    async def list_models(request: Request) -> ModelList:
        state.require_api(request)
        return ModelList(data=[ModelCard(id=name) for name in state.model_names])

    @routes.get("/health", responses=errors())
    async def health() -> HealthResponse:
        # The app exists only once its LM has loaded (the ingress asks it for its tokenizer
        # first), so the LM names are ready; a CLIP may still be warming up.
        ready = dict.fromkeys(state.lm_names, True)
        devices: dict[str, str] = {}
        if state.lm is not None and (device := await _bounded(state.lm.device(), None)):
            devices.update(dict.fromkeys(state.lm_names, device))
        if (clip := state.clip) is not None:
            # Asked together, so a replica that does not answer costs one timeout.
            loaded, device = await asyncio.gather(
                _bounded(clip.ready(), False), _bounded(clip.device(), None)
            )
            ready[clip.model_name] = bool(loaded)
            if device:
                devices[clip.model_name] = device
        return HealthResponse(models=list(state.model_names), ready=ready, devices=devices)

    return routes


async def _bounded(answer: Awaitable[T], default: T | None) -> T | None:
    """A backend's answer for /health, bounded: a health probe must answer even when a
    replica does not. One that fails or comes late counts as `default` (not ready, device
    unknown)."""
    try:
        return await asyncio.wait_for(answer, READY_TIMEOUT_S)
    except Exception:  # a replica that cannot say: the probe still answers
        logger.debug("a backend did not answer /health", exc_info=True)
        return default


def _method_not_allowed(routes: list[BaseRoute]) -> Callable[[Request, Exception], Any]:
    """Starlette's 405 names the methods of the first route on the path only; `Allow` must
    name every method the path serves (RFC 9110), and several routes share a path here.
    `routes`: every route, those of the included routers too (the app only wraps those)."""

    async def handler(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        methods = {
            method
            for route in routes
            if route.matches(request.scope)[0] != Match.NONE
            for method in getattr(route, "methods", None) or ()
        }
        error = ApiError(f"Method {request.method} is not allowed here.").body()
        error["error"]["type"] = INVALID_REQUEST
        return JSONResponse(error, status_code=405, headers={"Allow": ", ".join(sorted(methods))})

    return handler


def _typed(schema: dict[str, Any], kind: str) -> Iterator[dict[str, Any]]:
    """`schema`, or those of its `anyOf` branches, of JSON type `kind`."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == kind:
            yield branch


def _document_limits(state: AppState) -> Callable[[dict[str, Any]], None]:
    """The server's limits, which the handlers enforce, written into the request schemas."""
    settings = state.settings

    def document(openapi: dict[str, Any]) -> None:
        schemas = openapi["components"]["schemas"]
        completion = schemas["CompletionRequest"]["properties"]
        completion["n"]["maximum"] = settings.max_n
        for branch in _typed(completion["prompt"], "array"):
            if branch["items"].get("type") != "integer":  # a list of prompts, not of ids
                branch["maxItems"] = settings.max_prompts
        if state.lm is not None:  # text prompts are refused past this before tokenising
            max_chars = state.lm.max_context * settings.max_prompt_chars_per_token
            for branch in _typed(completion["prompt"], "string"):
                branch["maxLength"] = max_chars
            for branch in _typed(completion["prompt"], "array"):
                for item in _typed(branch["items"], "string"):
                    item["maxLength"] = max_chars
        for branch in _typed(schemas["MoraOptions"]["properties"]["top_k"], "integer"):
            branch["maximum"] = settings.max_top_k
        classify = schemas["ClassifyRequest"]["properties"]
        form = openapi["paths"]["/classify"]["post"]["requestBody"]["content"]
        form = form["multipart/form-data"]["schema"]["properties"]
        for images in (classify["images"], form["images"]):
            images["maxItems"] = settings.max_images
        for labels in (*_typed(classify["labels"], "array"), form["labels"]):
            labels["maxItems"] = settings.max_labels
            labels["items"]["maxLength"] = settings.max_label_chars

    return document
