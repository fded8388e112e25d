"""Over a real socket (uvicorn on 127.0.0.1): the stock `openai` client, and client
disconnects that must abort the engine requests."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.serving import fakes
from tests.serving.conftest import make_app

SCRIPT = "Hello, world! "


@pytest.fixture
def slow_lm() -> fakes.FakeLM:
    return fakes.FakeLM(SCRIPT * 10, token_delay_s=0.02)


@pytest.fixture
def base_url(lm) -> Iterator[str]:
    with fakes.running_server(make_app(lm, api_token="sk-test")) as url:
        yield url


@pytest.fixture
def sdk(base_url) -> Iterator[openai.OpenAI]:
    http = httpx.Client(trust_env=False)
    yield openai.OpenAI(
        base_url=f"{base_url}/v1", api_key="sk-test", http_client=http, max_retries=0
    )
    http.close()


def wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_sdk_non_streaming(sdk, lm):
    completion = sdk.completions.create(
        model="fake-lm",
        prompt="Say hi",
        max_tokens=5,
        n=2,
        seed=3,
        logprobs=1,
        extra_body={"mora": {"top_k": 2}},
    )
    assert completion.id.startswith("cmpl-")
    assert [c.text for c in completion.choices] == [
        fakes.decode(lm.output_ids(3)[:5]),
        fakes.decode(lm.output_ids(4)[:5]),
    ]
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].logprobs.tokens == list(fakes.decode(lm.output_ids(3)[:5]))
    assert completion.usage.completion_tokens == 10
    assert completion.model_extra["mora"]["pool_version"] == lm.pool_version
    assert lm.requests[0][2].top_k == 2


def test_sdk_streaming_with_usage(sdk):
    stream = sdk.completions.create(
        model="fake-lm",
        prompt="Say hi",
        max_tokens=6,
        stop=["world"],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({chunk.id for chunk in chunks}) == 1
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == SCRIPT[:6]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_sdk_errors_are_typed(sdk, base_url):
    with pytest.raises(openai.NotFoundError):
        sdk.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError) as info:
        sdk.completions.create(model="fake-lm", prompt="x", temperature=5)
    assert info.value.param == "temperature"
    http = httpx.Client(trust_env=False)
    bad_key = openai.OpenAI(
        base_url=f"{base_url}/v1", api_key="nope", max_retries=0, http_client=http
    )
    with pytest.raises(openai.AuthenticationError):
        bad_key.completions.create(model="fake-lm", prompt="x")
    assert [m.id for m in sdk.models.list()] == ["fake-lm"]
    http.close()


def test_stream_disconnect_cancels_the_engine_request(slow_lm):
    with fakes.running_server(make_app(slow_lm)) as url, httpx.Client(trust_env=False) as http:
        body = {"model": "fake-lm", "prompt": "x", "max_tokens": 100, "stream": True, "n": 2}
        with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            first = next(response.iter_lines())
            assert first.startswith("data: ")
        # leaving the block closes the connection mid-stream
        assert wait_for(lambda: len(slow_lm.cancelled) == 2), slow_lm.cancelled
    assert not slow_lm.finished


def test_non_stream_disconnect_cancels_the_engine_request(slow_lm):
    with fakes.running_server(make_app(slow_lm)) as url:
        body = {"model": "fake-lm", "prompt": "x", "max_tokens": 100}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, timeout=0.3, trust_env=False)
        assert wait_for(lambda: len(slow_lm.cancelled) == 1), slow_lm.cancelled
    assert not slow_lm.finished
