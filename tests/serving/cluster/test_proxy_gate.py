"""The proxy's gate in front of the real HTTP app: it learns the bound the app announces,
refuses past it without the app seeing the request, and lets everything else through."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from serving.cluster import proxy_gate
from serving.cluster.proxy_gate import CALLBACK, CALLBACK_ENV, GATE_ENV, CompletionGate
from serving.http.middleware import BOUND_HEADER
from tests.serving import fakes
from tests.serving.conftest import assert_openai_error, make_app

TOKEN = "secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def gated_app(
    lm: fakes.FakeLM, ask_bound: Any = None, **settings: Any
) -> tuple[CompletionGate, fakes.RecordingMetrics]:
    metrics = fakes.RecordingMetrics()
    app = make_app(lm, api_token=TOKEN, **settings)
    gate = CompletionGate(app, api_token=TOKEN, metrics=metrics, ask_bound=ask_bound)
    return gate, metrics


def client(gate: CompletionGate) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://gate")


def completion(lm: fakes.FakeLM, max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    return {"model": lm.model_name, "prompt": "hello", "max_tokens": max_tokens, **extra}


async def until(condition, what: str, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def announce_then_hold(
    http: httpx.AsyncClient, gate: CompletionGate, lm: fakes.FakeLM, tokens: int, **extra: Any
) -> asyncio.Future:
    """One completion answered (the app announces its bound to the gate), then one of
    `tokens` held in flight."""
    await http.post("/v1/completions", json=completion(lm, 1), headers=AUTH)
    body = completion(lm, tokens, **extra)
    held = asyncio.ensure_future(http.post("/v1/completions", json=body, headers=AUTH))
    await until(lambda: gate.inflight == 1, "the held request")
    return held


def test_the_gate_learns_the_bound_and_refuses_past_it_before_the_app() -> None:
    lm = fakes.FakeLM(token_delay_s=0.05)
    gate, metrics = gated_app(lm, max_inflight_completions=2)

    async def scenario() -> None:
        async with client(gate) as http:
            first = await http.post("/v1/completions", json=completion(lm, 1), headers=AUTH)
            assert first.status_code == 200, first.text
            assert gate.bound == 2  # announced by the app ...
            assert BOUND_HEADER.decode() not in first.headers  # ... and never passed on
            assert first.headers["content-type"] == "application/json"  # the rest are
            held = [
                asyncio.ensure_future(
                    http.post("/v1/completions", json=completion(lm, 16), headers=AUTH)
                )
                for _ in range(2)
            ]
            await until(lambda: len(lm.requests) == 3, "both held requests to reach the app")
            assert gate.inflight == 2
            refused = await http.post("/v1/completions", json=completion(lm), headers=AUTH)
            error = assert_openai_error(refused, 503)
            assert error["code"] == "overloaded" and "at this proxy" in error["message"]
            assert refused.headers["retry-after"] == "1"
            assert len(lm.requests) == 3  # the app never saw it
            # The gate reports only its refusals (the app reports what reaches it).
            calls = [(name, args[:2]) for name, args in metrics.calls]
            assert calls == [("request_finished", ("/v1/completions", 503))]
            assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
            assert gate.inflight == 0
            again = await http.post("/v1/completions", json=completion(lm, 1), headers=AUTH)
            assert again.status_code == 200

    asyncio.run(scenario())


def test_streams_hold_their_place_until_they_end() -> None:
    lm = fakes.FakeLM(token_delay_s=0.05)
    gate, _ = gated_app(lm, max_inflight_completions=1)

    async def scenario() -> None:
        async with client(gate) as http:
            stream = await announce_then_hold(http, gate, lm, 12, stream=True)
            refused = await http.post("/v1/completions", json=completion(lm), headers=AUTH)
            assert_openai_error(refused, 503)
            streamed = await stream
            assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
            assert BOUND_HEADER.decode() not in streamed.headers
            assert streamed.headers["content-type"].startswith("text/event-stream")
            assert gate.inflight == 0

    asyncio.run(scenario())


def test_nothing_is_refused_until_a_bound_is_announced() -> None:
    lm = fakes.FakeLM(token_delay_s=0.05)
    # The app does not announce (refuse_at_proxy off): it refuses past its bound itself.
    gate, _ = gated_app(lm, max_inflight_completions=1, refuse_at_proxy=False)

    async def scenario() -> None:
        async with client(gate) as http:
            held = asyncio.ensure_future(
                http.post("/v1/completions", json=completion(lm, 16), headers=AUTH)
            )
            await until(lambda: len(lm.requests) == 1, "the held request")
            refused = await http.post("/v1/completions", json=completion(lm), headers=AUTH)
            error = assert_openai_error(refused, 503)
            assert "at this proxy" not in error["message"]  # the app's own refusal
            assert (await held).status_code == 200
            assert gate.bound is None

    asyncio.run(scenario())


def test_other_routes_and_unauthenticated_requests_pass_the_full_gate() -> None:
    lm = fakes.FakeLM(token_delay_s=0.05)
    gate, _ = gated_app(lm, max_inflight_completions=1)

    async def scenario() -> None:
        async with client(gate) as http:
            held = await announce_then_hold(http, gate, lm, 16)
            assert (await http.get("/health")).status_code == 200
            assert (await http.get("/v1/models", headers=AUTH)).status_code == 200
            # The app answers 401 (not counted, not refused at the proxy).
            anonymous = await http.post("/v1/completions", json=completion(lm))
            assert_openai_error(anonymous, 401)
            wrong = {"Authorization": "Bearer nope"}
            assert_openai_error(
                await http.post("/v1/completions", json=completion(lm), headers=wrong), 401
            )
            assert gate.inflight == 1
            assert (await held).status_code == 200

    asyncio.run(scenario())


def test_a_request_cancelled_midway_releases_its_place() -> None:
    lm = fakes.FakeLM(token_delay_s=0.05)
    gate, _ = gated_app(lm, max_inflight_completions=1)

    async def scenario() -> None:
        async with client(gate) as http:
            held = await announce_then_hold(http, gate, lm, 64)
            held.cancel()  # the client goes away
            await until(lambda: gate.inflight == 0, "its place to be released")
            ok = await http.post("/v1/completions", json=completion(lm, 1), headers=AUTH)
            assert ok.status_code == 200

    asyncio.run(scenario())


def test_a_response_without_the_announcement_lifts_the_bound() -> None:
    # An app redeployed without the announcement (or an answer from elsewhere, such as the
    # proxy's own error when the app is away) must not leave a stale bound in force.
    announcing = True

    async def app(scope, receive, send) -> None:
        headers = [(b"content-type", b"application/json")]
        if announcing:
            headers.append((BOUND_HEADER, b"1"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})

    gate = CompletionGate(app)

    async def scenario() -> None:
        nonlocal announcing
        async with client(gate) as http:
            assert (await http.post("/v1/completions", json={})).status_code == 200
            assert gate.bound == 1
            announcing = False
            assert (await http.post("/v1/completions", json={})).status_code == 200
            assert gate.bound is None

    asyncio.run(scenario())


class AskedIngress:
    """The ingress as the gate asks it: answers `bound` (or raises `error`), counting."""

    def __init__(self, bound: int | None, error: Exception | None = None) -> None:
        self.bound, self.error, self.calls = bound, error, 0

    async def __call__(self) -> int | None:
        self.calls += 1
        await asyncio.sleep(0.05)
        if self.error is not None:
            raise self.error
        return self.bound


@pytest.mark.parametrize(
    ("ingress", "refused"),
    [
        (AskedIngress(1), True),  # still 1: the refusal stands, asked once for all
        (AskedIngress(8), False),  # redeployed with room for more: let them in
        (AskedIngress(None), False),  # no longer announcing
        (AskedIngress(1, error=RuntimeError("replica gone")), False),
    ],
)
def test_a_stale_bound_is_asked_again_before_it_refuses(
    ingress: AskedIngress, refused: bool
) -> None:
    lm = fakes.FakeLM(token_delay_s=0.05)
    gate, _ = gated_app(lm, ask_bound=ingress, max_inflight_completions=1)

    async def scenario() -> None:
        async with client(gate) as http:
            held = await announce_then_hold(http, gate, lm, 16)
            gate.confirmed_at -= 2 * proxy_gate.FRESH_S  # no response for a while
            others = await asyncio.gather(
                *(
                    http.post("/v1/completions", json=completion(lm, 1), headers=AUTH)
                    for _ in range(3)
                )
            )
            await held
        statuses = [r.status_code for r in others]
        if refused:
            assert statuses == [503, 503, 503]
        else:  # through to the app, which refuses past its own bound of 1 or serves
            assert all("at this proxy" not in r.text for r in others), statuses
        assert ingress.calls == 1  # one question for the three that waited on it

    asyncio.run(scenario())


def test_a_fresh_bound_is_not_asked() -> None:
    lm = fakes.FakeLM(token_delay_s=0.05)
    ingress = AskedIngress(1)
    gate, _ = gated_app(lm, ask_bound=ingress, max_inflight_completions=1)

    async def scenario() -> None:
        async with client(gate) as http:
            held = await announce_then_hold(http, gate, lm, 16)
            refused = await http.post("/v1/completions", json=completion(lm), headers=AUTH)
            assert refused.status_code == 503 and "at this proxy" in refused.text
            await held
        assert ingress.calls == 0

    asyncio.run(scenario())


def test_the_gate_asks_the_deployment_the_ingress_is() -> None:
    from serving.cluster.ingress import MoraIngress
    from serving.config import INGRESS_DEPLOYMENT

    assert MoraIngress.name == INGRESS_DEPLOYMENT
    assert callable(MoraIngress.func_or_class.announced_bound)


def test_configure_sets_and_clears_the_cluster_environment() -> None:
    env: dict[str, str] = {}
    proxy_gate.configure(env, True, TOKEN)
    assert env == {CALLBACK_ENV: CALLBACK, GATE_ENV: json.dumps({"api_token": TOKEN})}
    proxy_gate.configure(env, False, None)
    assert env == {}
    own = {CALLBACK_ENV: "my.proxy.callback"}
    proxy_gate.configure(own, False, None)  # the operator's callback is kept when off
    assert own == {CALLBACK_ENV: "my.proxy.callback"}
    proxy_gate.configure(own, True, None)
    assert own[CALLBACK_ENV] == CALLBACK and json.loads(own[GATE_ENV]) == {"api_token": None}


def test_the_proxy_callback_builds_the_gate_with_its_token(monkeypatch) -> None:
    import serving.cluster.metrics as metrics_module

    monkeypatch.setattr(metrics_module, "RayMetricsHook", fakes.RecordingMetrics)
    monkeypatch.delenv(GATE_ENV, raising=False)
    monkeypatch.setenv("MORA_API_TOKEN", "from-env")
    (middleware,) = proxy_gate.middlewares()
    assert middleware.cls is CompletionGate and middleware.kwargs["api_token"] == "from-env"
    assert middleware.kwargs["ask_bound"] is proxy_gate.ask_ingress
    monkeypatch.setenv(GATE_ENV, json.dumps({"api_token": None}))
    (middleware,) = proxy_gate.middlewares()
    assert middleware.kwargs["api_token"] is None
    assert isinstance(middleware.kwargs["metrics"], fakes.RecordingMetrics)


@pytest.mark.parametrize("refuse_at_proxy", [True, False])
def test_the_app_announces_its_bound_on_completions_only(refuse_at_proxy: bool) -> None:
    from fastapi.testclient import TestClient

    lm = fakes.FakeLM()
    app = make_app(lm, max_inflight_completions=7, refuse_at_proxy=refuse_at_proxy)
    header = BOUND_HEADER.decode()
    with TestClient(app) as http:
        done = http.post("/v1/completions", json=completion(lm, 1))
        bad = http.post("/v1/completions", json={"model": lm.model_name})  # no prompt: 400
        health = http.get("/health")
    assert done.status_code == 200 and bad.status_code == 400 and health.status_code == 200
    expected = "7" if refuse_at_proxy else None
    assert done.headers.get(header) == expected and bad.headers.get(header) == expected
    assert header not in health.headers
