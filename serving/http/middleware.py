"""ASGI middlewares of the HTTP app: the body-size limit (413 before a body is read or
parsed, chunked bodies counted as they stream in), per-request metrics, and the bound on
completions in flight announced to a gate in the proxy."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.http.backend import MetricsHook
from serving.http.errors import PayloadTooLarge

COMPLETIONS = "/v1/completions"
# The bound on completions in flight, for a gate in the proxy in front of the app
# (serving/cluster/proxy_gate.py), which removes it; on a cluster whose proxies do not run
# the gate, clients see it (a number, nothing secret).
BOUND_HEADER = b"x-mora-inflight-bound"


def route(scope: Scope) -> str:
    """The request's path without a trailing slash ("/" for the root)."""
    return scope["path"].rstrip("/") or "/"


def is_completion(scope: Scope) -> bool:
    return scope["type"] == "http" and scope["method"] == "POST" and route(scope) == COMPLETIONS


class AnnounceBound:
    """Names the app's bound on every completion response, for the proxy's gate."""

    def __init__(self, app: ASGIApp, bound: int) -> None:
        self.app, self.header = app, (BOUND_HEADER, str(bound).encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not is_completion(scope):
            await self.app(scope, receive, send)
            return

        async def announce(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, announce)


# Endpoints named in request metrics (a bounded label set); any other path is "other".
ENDPOINTS = (COMPLETIONS, "/v1/models", "/classify", "/v1/experts", "/health")


class BodyLimit:
    """Refuses bodies over `max_bytes` (413) by Content-Length, or while they stream in."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, per_path: dict[str, int] | None = None
    ) -> None:
        self.app, self.max_bytes, self.per_path = app, max_bytes, per_path or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route(scope)
        limit = min(self.max_bytes, self.per_path.get(path, self.max_bytes))
        too_large = PayloadTooLarge(f"The request body exceeds {limit} bytes.")
        length = dict(scope["headers"]).get(b"content-length", b"").decode() or "0"
        if not length.isdigit() or int(length) > limit:
            await too_large.response()(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large
            return message

        await self.app(scope, limited, send)


class RequestMetrics:
    """Reports every HTTP request (status, seconds to the end of its body) to the hook."""

    def __init__(self, app: ASGIApp, metrics: MetricsHook) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route(scope)
        endpoint = next((e for e in ENDPOINTS if path == e or path.startswith(e + "/")), "other")
        started = time.perf_counter()
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            self.metrics.request_finished(endpoint, status, time.perf_counter() - started)
