"""Request bodies are bounded in bytes before they are read or parsed."""

from __future__ import annotations

import json
import logging
import time

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
