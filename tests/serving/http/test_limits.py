"""Request bodies are bounded in bytes before they are read or parsed."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.serving import fakes
from tests.serving.conftest import assert_openai_error, make_app

logger = logging.getLogger(__name__)


class CountingLM(fakes.FakeLM):
    def __init__(self) -> None:
        super().__init__()
        self.tokenized = 0

    async def tokenize(self, text: str) -> list[int]:
        self.tokenized += 1
        return await super().tokenize(text)


def test_a_20_mb_completion_body_is_413_before_parsing_with_the_defaults() -> None:
    lm = CountingLM()
    body = json.dumps({"model": lm.model_name, "prompt": "x" * (20 << 20)})
    with TestClient(make_app(lm)) as client:
        started = time.perf_counter()
        response = client.post(
            "/v1/completions", content=body, headers={"content-type": "application/json"}
        )
        logger.info("20 MB body refused in %.3f s", time.perf_counter() - started)
    assert_openai_error(response, 413)
    assert lm.tokenized == 0 and not lm.requests


def test_chunked_completion_body_is_counted_and_refused() -> None:
    lm = CountingLM()

    def chunks():
        yield b'{"model": "fake-lm", "prompt": "'
        for _ in range(12):
            yield b"x" * (1 << 20)
        yield b'"}'

    with TestClient(make_app(lm)) as client:
        response = client.post(
            "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
        )
    assert_openai_error(response, 413)
    assert lm.tokenized == 0 and not lm.requests


def test_a_text_prompt_over_the_character_bound_is_refused_before_tokenising() -> None:
    lm = CountingLM()  # context 256: at most 256 * 32 characters
    limit = lm.max_context * 32
    with TestClient(make_app(lm)) as client:
        started = time.perf_counter()
        too_long = client.post(
            "/v1/completions",
            json={"model": lm.model_name, "prompt": ["ok", "y" * (limit + 1)], "max_tokens": 1},
        )
        logger.info("over-long prompt refused in %.3f s", time.perf_counter() - started)
        error = assert_openai_error(too_long, 400, param="prompt[1]")
        assert error["code"] == "context_length_exceeded" and str(limit) in error["message"]
        assert lm.tokenized == 0 and not lm.requests
        # At the bound the prompt is tokenised and judged in tokens as before.
        at_bound = client.post(
            "/v1/completions",
            json={"model": lm.model_name, "prompt": "y" * limit, "max_tokens": 1},
        )
    assert_openai_error(at_bound, 400, param="max_tokens")
    assert lm.tokenized == 1


def test_the_character_bound_follows_the_setting() -> None:
    lm = CountingLM()
    app = make_app(lm, max_prompt_chars_per_token=1)
    with TestClient(app) as client:
        response = client.post(
            "/v1/completions",
            json={"model": lm.model_name, "prompt": "z" * (lm.max_context + 1)},
        )
    assert_openai_error(response, 400, param="prompt")
    assert lm.tokenized == 0


class HeldLM(CountingLM):
    """Every request waits for `go` before its first token."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()
        self.waiting = 0

    async def generate(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        self.waiting += 1
        await asyncio.to_thread(self.go.wait, 30)
        async for event in super().generate(*args, **kwargs):
            yield event


@pytest.mark.parametrize("stream", [False, True])
def test_completions_past_the_inflight_bound_are_refused_on_arrival(stream: bool) -> None:
    lm = HeldLM()
    body = {"model": lm.model_name, "prompt": "hi", "max_tokens": 4}
    with TestClient(make_app(lm, max_inflight_completions=2)) as client:
        with ThreadPoolExecutor(2) as pool:
            held = [
                pool.submit(client.post, "/v1/completions", json=body | {"stream": stream})
                for _ in range(2)
            ]
            deadline = time.monotonic() + 30
            while lm.waiting < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            started = time.perf_counter()
            refused = client.post("/v1/completions", json=body)
            logger.info("refused in %.4f s", time.perf_counter() - started)
            error = assert_openai_error(refused, 503)
            assert error["code"] == "overloaded" and refused.headers["Retry-After"]
            assert lm.tokenized == 2  # the refused one was never tokenised
            lm.go.set()
            assert [f.result(timeout=30).status_code for f in held] == [200, 200]
        # Both slots came back when the held requests ended.
        assert client.post("/v1/completions", json=body).status_code == 200


def test_refused_and_failed_completions_give_their_slot_back() -> None:
    lm = CountingLM()
    with TestClient(make_app(lm, max_inflight_completions=1)) as client:
        for body in (
            {"model": lm.model_name, "prompt": [10**9]},  # outside the vocabulary
            {"model": "no-such-model", "prompt": "hi"},
            {"model": lm.model_name, "prompt": "hi", "max_tokens": 10**6},  # over the context
            {"model": lm.model_name},  # no prompt
        ):
            assert client.post("/v1/completions", json=body).status_code in (400, 404)
        for stream in (False, True):
            body = {"model": lm.model_name, "prompt": "hi", "max_tokens": 3, "stream": stream}
            assert client.post("/v1/completions", json=body).status_code == 200


def test_the_inflight_bound_is_what_the_lm_replicas_admit() -> None:
    from serving.config import ServerConfig

    def bound(lm: dict[str, Any], **limits: Any) -> int | None:
        return ServerConfig.model_validate({"lm": lm, "limits": limits}).inflight_bound()

    engine = {"max_running": 8, "max_waiting": 10}
    assert bound(engine | {"max_ongoing_requests": 96, "max_queued_requests": 64}) == 18
    assert bound(engine | {"max_ongoing_requests": 4, "max_queued_requests": 2}) == 6
    assert bound(engine | {"max_queued_requests": -1, "replicas": 3}) == 54
    assert bound(engine, max_inflight_completions=500) == 500


def test_api_settings_default_to_the_server_config_and_are_built_from_it() -> None:
    """The limits have one set of defaults (serving/config.py): ApiSettings restates none,
    and a served app gets every limit of its config."""
    from dataclasses import asdict

    from serving.config import LimitSettings, RoutingSettings, ServerConfig
    from serving.http.api import ApiSettings
    from serving.http.protocol import Limits

    defaults = LimitSettings().model_dump()
    settings = asdict(ApiSettings())
    assert {k: settings[k] for k in defaults} == defaults
    assert settings["max_top_k"] == RoutingSettings().max_top_k
    assert Limits() == ApiSettings().limits()
    assert set(settings) - set(defaults) == {
        "admin_token",
        "api_token",
        "max_top_k",
        "served_model_names",
    }

    # Every limit differs from its default here, so one that from_config drops shows.
    changed = {k: (not v) if isinstance(v, bool) else (v or 0) * 2 + 1 for k, v in defaults.items()}
    cfg = ServerConfig.model_validate(
        {"limits": changed, "lm": {"routing": {"max_top_k": 9}}, "admin_token": "a"}
    )
    built = asdict(ApiSettings.from_config(cfg))
    assert {k: built[k] for k in changed} == changed
    assert (built["max_top_k"], built["admin_token"], built["api_token"]) == (9, "a", None)
    assert built["served_model_names"] == (cfg.lm.served_name,)
    unbounded = ServerConfig.model_validate({"lm": {"max_running": 2, "max_waiting": 3}})
    assert ApiSettings.from_config(unbounded).max_inflight_completions == 5
