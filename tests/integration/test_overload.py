"""Backpressure: one LM replica taking one request at a time with a queue of one.

Redeploys the app with that config (Ray keeps running); a stream that would run for minutes
holds the only slot, so of the requests sent meanwhile one waits in the queue and the rest
are refused at once with a 503, an OpenAI error body and Retry-After, by the gate in Serve's
HTTP proxy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serving.cluster.proxy_gate import FRESH_S, ask_ingress
from serving.http.middleware import BOUND_HEADER
from tests.integration.builders import LONG_CONTEXT
from tests.integration.conftest import LM_NAME, wait_for

pytestmark = pytest.mark.integration
logger = logging.getLogger(__name__)

EXTRA_REQUESTS = 4


@pytest.fixture(scope="module")
def tight(cluster, tiny_lm_dir):
    cfg = cluster.config(
        lm={
            "model_dir": str(tiny_lm_dir),
            "served_name": LM_NAME,
            "replicas": 1,
            "torch_threads": 1,
            "max_ongoing_requests": 1,
            "max_queued_requests": 1,
        },
        clip={"enabled": False},
    )
    cluster.deploy(cfg)
    return cluster


def test_overload_is_a_fast_503_with_a_json_body(tight) -> None:
    refusals = {"name": "ray_mora_requests_total", "endpoint": "/v1/completions", "code": "503"}
    refused_before = tight.metric_sum(**refusals) or 0.0
    holder = tight.openai().completions.create(
        model=LM_NAME, prompt="hello world", max_tokens=LONG_CONTEXT - 64, stream=True
    )

    def attempt(_: int) -> tuple[httpx.Response, float]:
        started = time.perf_counter()
        response = httpx.post(
            f"{tight.base_url}/v1/completions",
            json={"model": LM_NAME, "prompt": "the quick brown fox", "max_tokens": 8},
            timeout=300,
        )
        return response, time.perf_counter() - started

    pool = ThreadPoolExecutor(EXTRA_REQUESTS)
    try:
        assert next(iter(holder)).choices  # the holder is running: the slot is taken
        futures = [pool.submit(attempt, i) for i in range(EXTRA_REQUESTS)]
        # Refusals come back while the holder still runs; the queued one waits for it.
        wait_for(
            lambda: sum(f.done() for f in futures) >= EXTRA_REQUESTS - 1,
            "the refusals",
            120,
        )
    finally:
        holder.close()  # frees the slot: the queued request runs now
    results = [future.result(timeout=300) for future in futures]
    pool.shutdown()

    refused = [(r, s) for r, s in results if r.status_code == 503]
    served = [(r, s) for r, s in results if r.status_code == 200]
    logger.info(
        "refused in %s s; served in %s s",
        [round(s, 3) for _, s in refused],
        [round(s, 3) for _, s in served],
    )
    assert len(refused) + len(served) == EXTRA_REQUESTS, [r.text for r, _ in results]
    assert refused and served
    for response, _ in refused:
        assert response.headers.get("content-type") == "application/json", (
            response.headers,
            response.text,
        )
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert response.headers.get("retry-after")
    # Refused in Ray Serve's proxy, by the gate, before the hop to the ingress (the bound it
    # learned from the holder's response, which it kept from the client).
    messages = [response.json()["error"]["message"] for response, _ in refused]
    assert any("at this proxy" in message for message in messages), messages
    assert not any(BOUND_HEADER.decode() in response.headers for response, _ in results)
    # The gate's question when its bound may be stale (after a redeploy): the same handle
    # call the proxies make, answered with the bound in force.
    assert asyncio.run(ask_ingress()) == 2
    # ... and counted there: every refusal is in the request counter, wherever it happened.
    wait_for(
        lambda: (tight.metric_sum(**refusals) or 0.0) >= refused_before + len(refused),
        "the refusals in the request counter",
        60,
    )
    assert tight.complete("hello world", 4)["usage"]["completion_tokens"] == 4


def test_the_proxy_asks_the_ingress_before_refusing_by_a_stale_bound(tight) -> None:
    """A greedy stream (no end in sight) takes the model's one slot and a second request
    waits in its queue: the bound of 2 is full. Once no response has started for longer
    than FRESH_S, the gate asks the ingress for the bound from inside the proxy (a
    deployment handle) before it refuses by it; had the question failed, the request
    would have gone on to the ingress and been refused there, not "at this proxy"."""
    holder = tight.openai().completions.create(
        model=LM_NAME,
        prompt="hello world",
        max_tokens=LONG_CONTEXT - 64,
        temperature=0,
        stream=True,
    )
    pool = ThreadPoolExecutor(1)
    try:
        assert next(iter(holder)).choices
        queued = pool.submit(tight.complete, "hello there", 4)
        time.sleep(2 * FRESH_S)
        late = httpx.post(
            f"{tight.base_url}/v1/completions",
            json={"model": LM_NAME, "prompt": "the quick brown fox", "max_tokens": 8},
            timeout=300,
        )
    finally:
        holder.close()
    assert queued.result(timeout=300)["usage"]["completion_tokens"] == 4
    pool.shutdown()
    error = late.json()["error"]
    assert late.status_code == 503 and "at this proxy" in error["message"], late.text
