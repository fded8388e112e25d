"""A lost model replica (ActorDiedError) through the ingress backends, with fake handles.

Not yet answered: the call is sent again and succeeds. Already answered: a retryable 503
(`ServiceUnavailable`, Retry-After), never a bare exception that the app turns into a 500.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ray import exceptions as ray_exceptions
from ray.exceptions import ActorDiedError

from serving.cluster import ingress
from serving.cluster.protocol import Refusal
from serving.http.errors import ApiError, ServiceUnavailable
from tests.serving import fakes


class FakeStream:
    """What `handle.options(stream=True).generate.remote(...)` returns."""

    def __init__(self, items: list[Any], die_after: int | None) -> None:
        self.items, self.die_after, self.cancelled = items, die_after, False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> Any:
        if self.die_after is not None and self.die_after == 0:
            raise ActorDiedError()
        if not self.items:
            raise StopAsyncIteration
        if self.die_after is not None:
            self.die_after -= 1
        return self.items.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """Each call dies after `plan[i]` items (None: never)."""

    def __init__(self, plan: list[int | None]) -> None:
        self.plan, self.calls = plan, 0
        self.generate = self
        self.classify = self

    def options(self, **_: Any) -> FakeHandle:
        return self

    def remote(self, *args: Any) -> Any:
        die_after = self.plan[min(self.calls, len(self.plan) - 1)]
        self.calls += 1
        if len(args) == 3:  # classify(images, labels, mora)
            return self._classify(die_after)
        return FakeStream([[event(0, None)], [event(1, "length")]], die_after)

    async def _classify(self, die_after: int | None) -> str:
        if die_after is not None:
            raise ActorDiedError()
        return "classified"


def event(token: int, reason: str | None) -> fakes.TokenEvent:
    return fakes.TokenEvent("r", 65 + token, None, (), reason, 1)


@pytest.fixture(autouse=True)
def no_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingress, "REPLICA_RETRY_WAIT_S", 0.0)


def run_generate(handle: FakeHandle) -> list[fakes.TokenEvent]:
    backend = ingress.RayLMBackend(
        handle, tokenizer=None, model_name="m", max_context=64, vocab_size=128
    )

    async def collect() -> list[fakes.TokenEvent]:
        params: Any = fakes.SamplingParams(max_tokens=2)
        return [e async for e in backend.generate("r", [1, 2], params, stream=True)]

    return asyncio.run(collect())


def test_not_started_request_is_retried_on_a_live_replica() -> None:
    handle = FakeHandle([0, None])  # the first replica dies before answering
    events = run_generate(handle)
    assert handle.calls == 2
    assert [e.token_id for e in events] == [65, 66] and events[-1].finish_reason == "length"


def test_started_request_gets_a_retryable_503() -> None:
    handle = FakeHandle([1, None])  # dies after the first item reached the client
    with pytest.raises(ServiceUnavailable) as info:
        run_generate(handle)
    assert handle.calls == 1  # never replayed: the client already holds output
    assert info.value.status == 503 and info.value.headers.get("Retry-After")
    assert info.value.body()["error"]["code"] == "server_unavailable"


class RefusingHandle(FakeHandle):
    """The replica refuses the request on admission: one Refusal item, no events."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__([None])
        self.refusal = refusal

    def remote(self, *args: Any) -> Any:
        self.calls += 1
        return FakeStream([self.refusal], None)


@pytest.mark.parametrize(
    ("kind", "status", "code"), [("overloaded", 503, "overloaded"), ("bad_request", 400, None)]
)
def test_a_refusal_is_its_http_error_and_is_not_retried(
    kind: Any, status: int, code: str | None
) -> None:
    handle = RefusingHandle(Refusal(kind, f"refused: {kind}"))
    with pytest.raises(ApiError) as info:
        run_generate(handle)
    assert handle.calls == 1  # the request's own answer: never sent elsewhere
    body = info.value.body()["error"]
    assert info.value.status == status and body["message"] == f"refused: {kind}"
    assert (info.value.headers.get("Retry-After") is not None) == (kind == "overloaded")
    if code is not None:
        assert body["code"] == code


def test_retries_are_bounded() -> None:
    handle = FakeHandle([0])  # every replica dies
    with pytest.raises(ServiceUnavailable):
        run_generate(handle)
    assert handle.calls == ingress.REPLICA_RETRIES + 1


def test_classify_is_retried_then_503() -> None:
    backend = ingress.RayClipBackend(FakeHandle([0, None]), "c")
    assert asyncio.run(backend.classify([], None, None)) == "classified"
    dead = FakeHandle([0])
    with pytest.raises(ServiceUnavailable):
        asyncio.run(ingress.RayClipBackend(dead, "c").classify([], None, None))
    assert dead.calls == ingress.REPLICA_RETRIES + 1


@pytest.mark.parametrize(
    "error",
    [
        ActorDiedError(),
        ray_exceptions.NodeDiedError("node gone"),
        ray_exceptions.WorkerCrashedError(),
        ray_exceptions.ObjectLostError("00" * 28, None, "generate"),
        ray_exceptions.OwnerDiedError("00" * 28, None, "generate"),
        ray_exceptions.RaySystemError("raylet gone"),
        ray_exceptions.LocalRayletDiedError(),
        ray_exceptions.ActorUnavailableError("restarting", None),
    ],
    ids=lambda e: type(e).__name__,
)
def test_every_way_a_node_or_replica_is_lost_is_retryable(error: Exception) -> None:
    assert ingress.replica_lost(error)


def test_the_request_s_own_errors_are_not_mistaken_for_a_lost_replica() -> None:
    assert not ingress.replica_lost(ValueError("bad input"))
    assert not ingress.replica_lost(ray_exceptions.TaskCancelledError())
    wrapped = ray_exceptions.RayTaskError("generate", "Traceback ...", ValueError("bad"))
    assert not ingress.replica_lost(wrapped)
    died = ray_exceptions.RayTaskError("generate", "Traceback ...", ActorDiedError())
    assert ingress.replica_lost(died)
