"""The load-test client and runner against a small fake OpenAI-compatible server.

The fake (FastAPI + uvicorn on 127.0.0.1, a free port) streams SSE like the real server,
answers with a `mora` block, can fail on demand (503, a mid-stream error event, a stream
cut before [DONE]) and has a versioned expert registry for the hot-load scenario.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from loadtest import cli
from loadtest.client import LoadClient
from loadtest.compare import compare, load_summary
from loadtest.metrics import RequestRecord
from loadtest.runner import RunConfig, run
from loadtest.workload import Dist, RequestSpec

TOKEN_DELAY_S = 0.005
ADMIN = "fake-admin"


class FakeState:
    def __init__(self) -> None:
        self.version = 1
        self.sets: list[str] = []
        self.requests = 0
        self.mix_versions = False  # misbehave: report a set newer than the version


def fake_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    def mora() -> dict:
        sets = [*state.sets, "future-set"] if state.mix_versions else state.sets
        shares = [{"name": s, "share": 1 / len(sets)} for s in sets]
        return {"pool_version": state.version, "active_ranks_per_token": 2.5, "expert_sets": shares}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "fake-lm", "object": "model"}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request):
        state.requests += 1
        body = await request.json()
        prompt = body["prompt"]
        n = int(body.get("max_tokens", 4))
        if "please-503" in prompt:
            error = {"message": "at capacity", "type": "overloaded", "param": None, "code": 503}
            return JSONResponse({"error": error}, status_code=503)
        words = [f" w{i}" for i in range(n)]
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n}
        if not body.get("stream"):
            await asyncio.sleep(TOKEN_DELAY_S * n)
            choice = {"index": 0, "text": "".join(words), "finish_reason": "length"}
            return {"id": "x", "choices": [choice], "usage": usage, "mora": mora()}

        async def events():
            yield "data: " + json.dumps({"choices": [{"index": 0, "text": ""}]}) + "\n\n"
            for i, word in enumerate(words):
                await asyncio.sleep(TOKEN_DELAY_S)
                if "please-fail-midway" in prompt and i == 2:
                    yield 'data: {"error": {"message": "engine died", "type": "server_error"}}\n\n'
                    yield "data: [DONE]\n\n"
                    return
                if "please-cut" in prompt and i == 2:
                    return
                yield "data: " + json.dumps({"choices": [{"index": 0, "text": word}]}) + "\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                yield (
                    "data: " + json.dumps({"choices": [], "usage": usage, "mora": mora()}) + "\n\n"
                )
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        n = state.requests
        return (
            "# TYPE ray_mora_requests_total counter\n"
            f'ray_mora_requests_total{{endpoint="/v1/completions",code="200",replica="a"}} {n}\n'
            "# TYPE ray_mora_active_ranks_per_token histogram\n"
            f'ray_mora_active_ranks_per_token_bucket{{le="+Inf"}} {4 * n}\n'
            f"ray_mora_active_ranks_per_token_sum {10 * n}\n"
            f"ray_mora_active_ranks_per_token_count {4 * n}\n"
            "# TYPE ray_mora_pool_version gauge\n"
            f"ray_mora_pool_version {state.version}\n"
        )

    @app.post("/classify")
    async def classify(request: Request) -> dict:
        body = await request.json()
        assert body["images"]
        labels = [{"label": "circle", "probability": 0.9}, {"label": "star", "probability": 0.1}]
        return {"data": [{"index": 0, "labels": labels}], "mora": mora()}

    def admin_ok(request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {ADMIN}"

    @app.get("/v1/experts", response_model=None)
    async def list_sets(request: Request):
        if not admin_ok(request):
            return JSONResponse({"error": {"message": "no"}}, status_code=401)
        return {"version": state.version, "sets": [{"name": s} for s in state.sets]}

    @app.post("/v1/experts", response_model=None)
    async def load(request: Request):
        if not admin_ok(request):
            return JSONResponse({"error": {"message": "no"}}, status_code=401)
        name = (await request.json())["path"]
        await asyncio.sleep(0.05)
        state.version += 1
        state.sets.append(name)
        return {"action": "load", "name": name, "version": state.version}

    @app.delete("/v1/experts/{name}", response_model=None)
    async def retire(name: str, request: Request):
        if not admin_ok(request):
            return JSONResponse({"error": {"message": "no"}}, status_code=401)
        state.version += 1
        state.sets.remove(name)
        return {"action": "retire", "name": name, "version": state.version}

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_server() -> Iterator[tuple[str, FakeState]]:
    state = FakeState()
    port = free_port()
    config = uvicorn.Config(fake_app(state), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the fake server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(timeout=10)


def send(url: str, spec: RequestSpec, **client_kw) -> RequestRecord:
    async def go() -> RequestRecord:
        async with LoadClient(url, **client_kw) as client:
            return await client.send(spec, "fake-lm", warmup_s=0.0)

    return asyncio.run(go())


def spec(kind: str, prompt: str = "hello there", max_tokens: int = 6) -> RequestSpec:
    return RequestSpec(id=7, kind=kind, at=None, prompt=prompt, max_tokens=max_tokens)


def test_stream_timeline_usage_and_mora(fake_server) -> None:
    url, _ = fake_server
    r = send(url, spec("stream"))
    assert r.ok and r.status == 200, r.error_message
    assert r.output_tokens == 6 and r.prompt_tokens == 2
    assert len(r.chunk_times) == 6  # the empty first chunk is not a token
    assert r.start < r.first_text == r.chunk_times[0] <= r.chunk_times[-1] <= r.end
    assert r.pool_version == 1 and r.active_ranks == 2.5


def test_plain_completion_and_classify(fake_server) -> None:
    url, _ = fake_server
    r = send(url, spec("completions", max_tokens=3))
    assert r.ok and r.output_tokens == 3 and r.first_text is None and r.end > r.start
    c = send(url, spec("classify"))
    assert c.ok and c.kind == "classify" and c.active_ranks == 2.5


@pytest.mark.parametrize(
    ("kind", "prompt", "error", "status"),
    [
        ("completions", "please-503", "http_503", 503),
        ("stream", "please-503", "http_503", 503),
        ("stream", "please-fail-midway", "mid_stream", 200),
        ("stream", "please-cut", "incomplete_stream", 200),
    ],
)
def test_failures_become_error_types(fake_server, kind, prompt, error, status) -> None:
    url, _ = fake_server
    r = send(url, spec(kind, prompt))
    assert r.error == error and r.status == status
    assert r.error_message and r.end >= r.start
    if error == "mid_stream":
        assert "engine died" in r.error_message and len(r.chunk_times) == 2


def test_connection_refused_and_timeout(fake_server) -> None:
    r = send(f"http://127.0.0.1:{free_port()}", spec("completions"))
    assert r.error == "connect" and r.status == 0
    url, _ = fake_server
    slow = send(url, spec("completions", max_tokens=200), timeout_s=0.2)
    assert slow.error == "timeout"


def run_config(url: str, **kw) -> RunConfig:
    base = dict(
        url=url,
        duration_s=1.6,
        warmup_s=0.3,
        mix={"completions": 0.4, "stream": 0.4, "classify": 0.2},
        prompt_len=Dist.parse("uniform:4,12"),
        max_tokens=Dist.parse("uniform:2,8"),
        concurrency=3,
        drain_timeout_s=10,
        settle_s=0.0,
    )
    return RunConfig(**{**base, **kw})


def test_closed_and_open_loop_runs_are_bounded(fake_server) -> None:
    url, state = fake_server
    closed = asyncio.run(run(run_config(url, max_requests=25)))
    assert (
        len(closed.records)
        == 25
        == state.requests + sum(r.kind == "classify" for r in closed.records)
    )
    assert sorted(r.id for r in closed.records) == list(range(25))
    assert all(r.ok for r in closed.records) and closed.model == "fake-lm"
    opened = asyncio.run(run(run_config(url, concurrency=None, rate=20, arrival="constant")))
    assert 28 <= len(opened.records) <= 33  # 20/s for 1.6 s
    assert all(r.scheduled is not None and r.start >= r.scheduled - 0.05 for r in opened.records)
    assert opened.wall_s < 1.6 + 5


def test_hotload_run_writes_a_full_report(fake_server, tmp_path: Path, capsys) -> None:
    url, state = fake_server
    out = tmp_path / "out"
    args = [
        "run", "--url", url, "--duration", "2", "--warmup", "0.2", "--concurrency", "3",
        "--max-tokens", "uniform:2,6", "--metrics-url", f"{url}/metrics",
        "--scenario", "hotload", "--admin-token", ADMIN, "--hotload-every", "0.6",
        "--hotload-sets", "set-a,set-b,set-c,set-d", "--out", str(out),
    ]  # fmt: skip
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "PASSED" in printed and "ranks activated per token" in printed
    summary = load_summary(out / "summary.json")
    hot = summary["hotload"]
    assert hot["loads_ok"] == 3  # at 0.6, 1.2, 1.8 s; the 4th would be after the run
    assert hot["failed_requests"] == 0 and hot["mixed_version_responses"] == 0
    assert hot["during_swaps"]["requests"] + hot["outside_swaps"]["requests"] > 0
    assert len(hot["cleanup"]) == 3 and state.sets == []  # retired afterwards
    assert summary["formulas"]["ttft"] and summary["mora"]["responses_with_mora"] > 0
    lines = (out / "requests.jsonl").read_text().splitlines()
    assert len(lines) == summary["requests"]["sent"]
    assert RequestRecord.from_json(json.loads(lines[0])).id == 0
    for png in ("latency_cdf.png", "throughput.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert not any(c.regression for c in compare(summary, summary))
    server = summary["server_metrics"]
    assert server["available"] and server["mean_active_ranks_per_token"] == pytest.approx(2.5)
    assert server["requests_by_code"] == {'endpoint="/v1/completions",code="200"': state.requests}
    assert server["gauges_after"]["mora_pool_version"] == state.version


def test_hotload_detects_mixed_versions(fake_server, tmp_path: Path) -> None:
    url, state = fake_server
    state.mix_versions = True
    args = [
        "run", "--url", url, "--duration", "1.2", "--warmup", "0", "--concurrency", "2",
        "--mix", "completions=1", "--max-tokens", "2", "--metrics-url", "none",
        "--scenario", "hotload", "--admin-token", ADMIN, "--hotload-every", "0.5",
        "--hotload-sets", "a,b", "--out", str(tmp_path), "--no-plots",
    ]  # fmt: skip
    assert cli.main(args) == 1
    hot = load_summary(tmp_path / "summary.json")["hotload"]
    assert hot["mixed_version_responses"] > 0 and not hot["passed"]
