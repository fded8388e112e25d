"""A request the engine ended alone with an "error" event is a 400, never a truncated 200."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.serving import fakes
from tests.serving.conftest import assert_openai_error, make_app, sse_events


class FailingLM(fakes.FakeLM):
    """Yields `good` tokens, then ends the request with the engine's "error" event."""

    def __init__(self, good: int) -> None:
        super().__init__()
        self.good = good

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: Any, *, stream: bool
    ) -> AsyncIterator[fakes.TokenEvent]:
        for step in range(self.good):
            yield self._event(request_id, ord("a"), step, params, None, None)
        failed = self._event(request_id, None, self.good, params, "error", None)
        yield dataclasses.replace(failed, error="IndexError: index out of range")


BODY = {"model": "fake-lm", "prompt": "hi", "max_tokens": 8}


@pytest.mark.parametrize("streaming", [False, True])
def test_a_request_failing_at_once_is_a_400_naming_the_prompt(streaming):
    with TestClient(make_app(FailingLM(good=0))) as client:
        response = client.post("/v1/completions", json={**BODY, "stream": streaming})
    error = assert_openai_error(response, 400, "prompt")
    assert error["code"] == "invalid_prompt" and "IndexError" in error["message"]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_request_failing_mid_way_never_passes_for_a_finished_one(streaming):
    with TestClient(make_app(FailingLM(good=3))) as client:
        response = client.post("/v1/completions", json={**BODY, "stream": streaming})
    if not streaming:
        assert_openai_error(response, 400, "prompt")
        return
    assert response.status_code == 200  # the stream had begun: the error comes as an event
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "invalid_prompt"
    assert all(c["finish_reason"] is None for e in events[:-2] for c in e["choices"])
