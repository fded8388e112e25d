"""Fixtures for the HTTP app over fake backends (no Ray, no model)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serving.http.api import ApiSettings, create_app
from tests.serving import fakes

ADMIN_TOKEN = "admin-secret"


def make_app(
    lm: Any = None,
    clip: Any = None,
    admin: Any = None,
    *,
    metrics: Any = None,
    **settings: Any,
) -> FastAPI:
    return create_app(
        lm, clip, admin, ApiSettings(**settings), metrics=metrics, params_cls=fakes.SamplingParams
    )


def sse_events(text: str) -> list[Any]:
    """Split an SSE body into decoded `data:` payloads, checking the framing on the way."""
    assert text.endswith("\n\n"), "every event ends with a blank line"
    events: list[Any] = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_openai_error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.fixture
def lm() -> fakes.FakeLM:
    return fakes.FakeLM()


@pytest.fixture
def clip() -> fakes.FakeClip:
    return fakes.FakeClip()


@pytest.fixture
def admin() -> fakes.FakeAdmin:
    return fakes.FakeAdmin()


@pytest.fixture
def metrics() -> fakes.RecordingMetrics:
    return fakes.RecordingMetrics()


@pytest.fixture
def client(lm, clip, admin, metrics) -> Iterator[TestClient]:
    app = make_app(
        lm,
        clip,
        admin,
        metrics=metrics,
        admin_token=ADMIN_TOKEN,
        max_images=4,
        max_labels=8,
        max_image_pixels=256 * 256,
        max_body_bytes=1 << 20,
    )
    with TestClient(app) as test_client:
        yield test_client
