"""`GET /health`: 200 while the server answers, and each served model's readiness (a CLIP may
still be warming up while the LM serves), bounded in time."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from serving.http import api
from tests.serving import fakes
from tests.serving.conftest import make_app


def health(lm: object, clip: object) -> dict:
    with TestClient(make_app(lm, clip)) as client:
        response = client.get("/health")
    assert response.status_code == 200, response.text
    return response.json()


def test_health_lists_every_model_and_its_readiness(lm, clip) -> None:
    assert health(lm, clip) == {
        "status": "ok",
        "models": ["fake-lm", "fake-clip"],
        "ready": {"fake-lm": True, "fake-clip": True},
        "devices": {"fake-lm": "cpu", "fake-clip": "cpu"},
    }


def test_health_reports_the_device_each_model_serves_on(lm, clip) -> None:
    lm.device_name, clip.device_name = "cuda:0", "cuda:1"
    clip.is_ready = False  # a warming CLIP already knows where it will serve
    body = health(lm, clip)
    assert body["devices"] == {"fake-lm": "cuda:0", "fake-clip": "cuda:1"}
    assert body["ready"] == {"fake-lm": True, "fake-clip": False}


def test_every_served_lm_name_reports_the_lm_device(lm) -> None:
    lm.device_name = "cuda:0"
    app = make_app(lm, None, served_model_names=("public", "alias"))
    with TestClient(app) as client:
        body = client.get("/health").json()
    assert body["devices"] == {"public": "cuda:0", "alias": "cuda:0"}


def test_a_device_that_cannot_be_told_is_left_out(lm) -> None:
    class Broken(fakes.FakeClip):
        async def device(self) -> str:
            raise ConnectionError("replica unreachable")

    body = health(lm, Broken())
    assert body["devices"] == {"fake-lm": "cpu"}
    assert body["ready"] == {"fake-lm": True, "fake-clip": True}


def test_a_warming_clip_is_not_ready_and_the_server_stays_healthy(lm, clip) -> None:
    clip.is_ready = False
    body = health(lm, clip)
    assert body["status"] == "ok"
    assert body["ready"] == {"fake-lm": True, "fake-clip": False}


def test_each_served_lm_name_is_ready_and_no_clip_means_no_entry(lm) -> None:
    app = make_app(lm, None, served_model_names=("public", "alias"))
    with TestClient(app) as client:
        body = client.get("/health").json()
    assert body["models"] == ["public", "alias"]
    assert body["ready"] == {"public": True, "alias": True}


def test_a_clip_only_server_reports_the_clip(clip) -> None:
    clip.is_ready = False
    assert health(None, clip)["ready"] == {"fake-clip": False}


def test_a_readiness_answer_that_comes_late_counts_as_not_ready(
    lm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "READY_TIMEOUT_S", 0.1)
    slow = fakes.FakeClip(ready_delay_s=30.0)
    started = time.monotonic()
    body = health(lm, slow)
    assert body["ready"] == {"fake-lm": True, "fake-clip": False}
    assert body["devices"] == {"fake-lm": "cpu"}  # its device came late too: left out
    assert time.monotonic() - started < 10  # bounded by the timeout, not by the backend


def test_a_readiness_query_that_fails_counts_as_not_ready(lm) -> None:
    class Broken(fakes.FakeClip):
        async def ready(self) -> bool:
            raise ConnectionError("replica unreachable")

    assert health(lm, Broken())["ready"] == {"fake-lm": True, "fake-clip": False}


def test_the_openapi_document_describes_the_health_answer(lm, clip) -> None:
    doc = make_app(lm, clip).openapi()
    schema = doc["paths"]["/health"]["get"]["responses"]["200"]["content"]["application/json"]
    assert schema["schema"] == {"$ref": "#/components/schemas/HealthResponse"}
    model = doc["components"]["schemas"]["HealthResponse"]
    assert set(model["properties"]) == {"status", "models", "ready", "devices"}
    assert model["properties"]["ready"]["additionalProperties"] == {"type": "boolean"}
    assert model["properties"]["ready"]["description"]
    assert model["properties"]["devices"]["additionalProperties"] == {"type": "string"}
    assert "cuda:0" in model["properties"]["devices"]["description"]
