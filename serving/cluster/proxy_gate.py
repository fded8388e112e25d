"""Overload refused in Ray Serve's HTTP proxy, before a refused request costs an actor call.

The ingress counts the completions it has admitted and refuses past its bound
(`AppState.admit_completion`), but a request it refuses has already crossed from the proxy
to the ingress replica and back: under a burst of hundreds, that round trip, paid by every
refused request on the cores the model decodes on, is most of the wait for a 503. The gate
counts completions in flight through its own proxy and answers the same 503 there once
they reach the same bound.

Ray Serve builds each proxy's middlewares by calling the function named in
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` inside the proxy process, whose environment is
fixed when Ray starts (`launcher.start` sets it, with the API token in `GATE_ENV` so that a
request the ingress will refuse with 401 is neither counted nor refused here; on a cluster
started otherwise, the token comes from `MORA_API_TOKEN` as the ingress's does). The bound is
not: a redeploy or autoscaling changes it. So the ingress announces its bound on every
completion response (`serving.http.middleware.AnnounceBound`, a header the gate reads and
removes), and the gate refuses nothing until it has heard one (nor after a completion
response without one). Between responses a redeploy can change the bound unseen, so the gate
refuses only by a bound confirmed within the last `FRESH_S`; an older one it first asks the
ingress for (`MoraIngress.announced_bound`, one call shared by every request that waits on
it). A proxy sees only its own traffic, so it refuses only when that alone fills the bound:
the ingress stays the authority. A stale token at the gate only lets requests through to
the ingress.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.config import API_TOKEN_ENV, APP_NAME, INGRESS_DEPLOYMENT
from serving.http.api import bearer_matches
from serving.http.backend import MetricsHook
from serving.http.errors import Overloaded
from serving.http.middleware import BOUND_HEADER, COMPLETIONS, is_completion

logger = logging.getLogger(__name__)

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
GATE_ENV = "MORA_PROXY_GATE"  # JSON: {"api_token": str | null}
CALLBACK = f"{__name__}.middlewares"
FRESH_S = 1.0  # a bound older than this is asked again before anything is refused by it
ASK_TIMEOUT_S = 2.0  # an ingress that does not answer by then: refuse nothing, ask again later
AskBound = Callable[[], Awaitable[int | None]]


class CompletionGate:
    """The proxy side: refuses POST /v1/completions with 503 while as many are in flight
    here as the ingress last announced."""

    def __init__(
        self,
        app: ASGIApp,
        api_token: str | None = None,
        metrics: MetricsHook | None = None,
        ask_bound: AskBound | None = None,
    ) -> None:
        self.app, self.api_token, self.metrics = app, api_token, metrics
        self.ask_bound = ask_bound  # None: trust the last announcement however old
        self.bound: int | None = None  # until the ingress announces one
        self.confirmed_at = -float("inf")  # time.monotonic() of the last announcement
        self.inflight = 0
        self._asking: asyncio.Future[int | None] | None = None

    def announced(self, bound: int | None) -> None:
        self.bound, self.confirmed_at = bound, time.monotonic()

    async def current_bound(self) -> int | None:
        """The bound to refuse by: the last one announced while fresh, else the ingress's."""
        fresh = time.monotonic() - self.confirmed_at < FRESH_S
        if self.bound is None or fresh or self.ask_bound is None:
            return self.bound
        if self._asking is None:
            self._asking = asyncio.ensure_future(self._ask())
        return await asyncio.shield(self._asking)

    async def _ask(self) -> int | None:
        assert self.ask_bound is not None
        try:
            bound = await asyncio.wait_for(self.ask_bound(), ASK_TIMEOUT_S)
        except Exception as exc:  # the ingress away or busy: let requests through to it
            logger.info("the ingress did not say its bound (%s): not refusing", exc)
            bound = None
        finally:
            self._asking = None
        self.announced(bound)
        return bound

    def gated(self, scope: Scope) -> bool:
        if not is_completion(scope):
            return False
        if self.api_token is None:
            return True
        authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        return bearer_matches(authorization, self.api_token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.gated(scope):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        bound = self.bound
        if bound is not None and self.inflight >= bound:  # full by the last word: confirm it
            bound = await self.current_bound()
        if bound is not None and self.inflight >= bound:
            refusal = Overloaded(
                f"The server is at capacity ({bound} completions in flight at this "
                "proxy); retry shortly."
            )
            await refusal.response()(scope, receive, send)
            if self.metrics is not None:
                seconds = time.perf_counter() - started
                self.metrics.request_finished(COMPLETIONS, refusal.status, seconds)
            return

        async def learn(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Each completion response names the bound, or its absence: an app redeployed
                # without the announcement (or an answer that is not the app's) stops the
                # refusals here instead of leaving a stale bound in force.
                bound, headers = None, []
                for name, value in message.get("headers", ()):
                    if name.lower() == BOUND_HEADER:
                        bound = int(value)
                    else:
                        headers.append((name, value))
                self.announced(bound)
                message = {**message, "headers": headers}
            await send(message)

        self.inflight += 1
        try:  # until the response has been sent in full, or the client went away
            await self.app(scope, receive, learn)
        finally:
            self.inflight -= 1


def configure(environ: MutableMapping[str, str], enabled: bool, api_token: str | None) -> None:
    """Set (or, when not `enabled`, clear) what a Ray cluster's processes need in their
    environment for every proxy to run the gate. A proxy callback of the user's own is kept
    when the gate is off, and replaced (with a warning) when it is on."""
    environ.pop(GATE_ENV, None)
    if not enabled:
        if environ.get(CALLBACK_ENV) == CALLBACK:
            del environ[CALLBACK_ENV]
        return
    if environ.get(CALLBACK_ENV, CALLBACK) != CALLBACK:
        logger.warning("%s=%s replaced by the proxy gate", CALLBACK_ENV, environ[CALLBACK_ENV])
    environ[CALLBACK_ENV] = CALLBACK
    environ[GATE_ENV] = json.dumps({"api_token": api_token})


def middlewares() -> list[Middleware]:
    """Ray Serve's proxy callback: the gate, with the API token of `GATE_ENV` (else of
    `MORA_API_TOKEN`)."""
    from serving.cluster.metrics import RayMetricsHook

    raw = os.environ.get(GATE_ENV)
    token = json.loads(raw)["api_token"] if raw else os.environ.get(API_TOKEN_ENV) or None
    return [
        Middleware(CompletionGate, api_token=token, metrics=RayMetricsHook(), ask_bound=ask_ingress)
    ]


async def ask_ingress() -> int | None:
    """The bound the app's ingress announces now (None: it announces none)."""
    return await _ingress_handle().announced_bound.remote()


@functools.cache
def _ingress_handle():
    # One handle per process: each new handle sets up its own router with Serve.
    from ray import serve

    return serve.get_deployment_handle(INGRESS_DEPLOYMENT, app_name=APP_NAME)
