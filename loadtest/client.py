"""HTTP client for an OpenAI-compatible server (and MoRA's /classify and /v1/experts).

Each call fills a `RequestRecord` as things happen, on the caller's clock, and never raises
for what the server does: an HTTP error, a mid-stream SSE error event, a dropped connection
or a timeout become the record's `error` ("http_503", "mid_stream", "disconnect",
"timeout", ...). Only the stream's chunks carrying text count as tokens arriving.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx

from loadtest.metrics import RequestRecord
from loadtest.workload import RequestSpec, sample_image_png

Clock = Callable[[], float]


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))[:300]
    return str(body)[:300]


def apply_mora(record: RequestRecord, block: Any) -> None:
    """Copy a response's `mora` extension block into the record (ignored when absent)."""
    if not isinstance(block, dict):
        return
    if isinstance(block.get("pool_version"), int):
        record.pool_version = block["pool_version"]
    ranks = block.get("active_ranks_per_token")
    if isinstance(ranks, int | float):
        record.active_ranks = float(ranks)
    shares = block.get("expert_sets") or []
    record.expert_sets = {
        str(s["name"]): float(s.get("share", 0.0))
        for s in shares
        if isinstance(s, dict) and "name" in s
    }


class LoadClient:
    """One pooled `httpx.AsyncClient`; times are `clock()` values (seconds since run start)."""

    def __init__(
        self,
        base_url: str,
        *,
        clock: Clock | None = None,
        api_key: str | None = None,
        admin_token: str | None = None,
        timeout_s: float = 120.0,
        max_connections: int = 256,
        temperature: float = 1.0,
        transport: httpx.AsyncBaseTransport | None = None,  # tests: httpx.MockTransport
    ) -> None:
        start = time.perf_counter()
        self.clock = clock or (lambda: time.perf_counter() - start)
        self.admin_token = admin_token
        self.temperature = temperature
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> LoadClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ discovery
    async def first_model(self) -> str | None:
        response = await self.http.get("/v1/models")
        response.raise_for_status()
        data = response.json().get("data") or []
        return data[0]["id"] if data else None

    # ------------------------------------------------------------------ requests
    async def send(self, spec: RequestSpec, model: str | None, warmup_s: float) -> RequestRecord:
        record = RequestRecord(id=spec.id, kind=spec.kind, start=self.clock(), scheduled=spec.at)
        record.warmup = record.start < warmup_s
        try:
            if spec.kind == "stream":
                await self._stream(spec, model, record)
            elif spec.kind == "classify":
                await self._classify(spec, record)
            else:
                await self._complete(spec, model, record)
        except httpx.TimeoutException as exc:
            self._fail(record, "timeout", exc)
        except httpx.ConnectError as exc:
            self._fail(record, "connect", exc)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            self._fail(record, "disconnect", exc)
        except (ValueError, KeyError, TypeError) as exc:  # unparsable answer
            self._fail(record, "bad_response", exc)
        if record.end != record.end:  # NaN: not set by a failure path
            record.end = self.clock()
        return record

    def _fail(self, record: RequestRecord, kind: str, exc: BaseException | str) -> None:
        record.error = kind
        record.error_message = str(exc)[:300] or type(exc).__name__
        record.end = self.clock()

    def _body(self, spec: RequestSpec, model: str | None, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": spec.prompt,
            "max_tokens": spec.max_tokens,
            "temperature": self.temperature,
            "seed": spec.id,
            **extra,
        }
        if model is not None:
            body["model"] = model
        return body

    async def _complete(self, spec: RequestSpec, model: str | None, record: RequestRecord) -> None:
        response = await self.http.post("/v1/completions", json=self._body(spec, model))
        record.status = response.status_code
        if response.status_code >= 400:
            self._fail(record, f"http_{response.status_code}", _error_message(response))
            return
        body = response.json()
        record.end = self.clock()
        usage = body.get("usage") or {}
        record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        record.output_tokens = int(usage.get("completion_tokens") or 0)
        apply_mora(record, body.get("mora"))

    async def _stream(self, spec: RequestSpec, model: str | None, record: RequestRecord) -> None:
        body = self._body(spec, model, stream=True, stream_options={"include_usage": True})
        async with self.http.stream("POST", "/v1/completions", json=body) as response:
            record.status = response.status_code
            if response.status_code >= 400:
                await response.aread()
                self._fail(record, f"http_{response.status_code}", _error_message(response))
                return
            done = False
            chunks = 0
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                event = json.loads(payload)
                if "error" in event:
                    message = event["error"]
                    if isinstance(message, dict):
                        message = message.get("message", "")
                    self._fail(record, "mid_stream", str(message))
                    return
                now = self.clock()
                if any(c.get("text") for c in event.get("choices") or []):
                    chunks += 1
                    record.chunk_times.append(now)
                    if record.first_text is None:
                        record.first_text = now
                if event.get("usage"):
                    record.prompt_tokens = int(event["usage"].get("prompt_tokens") or 0)
                    record.output_tokens = int(event["usage"].get("completion_tokens") or 0)
                apply_mora(record, event.get("mora"))
            record.end = self.clock()
            if not done:
                self._fail(record, "incomplete_stream", "the stream ended without [DONE]")
            elif record.output_tokens == 0:
                record.output_tokens = chunks  # a server that sends no usage chunk

    async def _classify(self, spec: RequestSpec, record: RequestRecord) -> None:
        image = sample_image_png(spec.image_seed)
        response = await self.http.post("/classify", json={"images": [image], "top_k": 3})
        record.status = response.status_code
        if response.status_code >= 400:
            self._fail(record, f"http_{response.status_code}", _error_message(response))
            return
        body = response.json()
        record.end = self.clock()
        if not body.get("data"):
            raise ValueError("classify answer without data")
        apply_mora(record, body.get("mora"))

    # ------------------------------------------------------------------ admin
    def _admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}

    async def list_sets(self) -> dict[str, Any]:
        response = await self.http.get("/v1/experts", headers=self._admin_headers())
        response.raise_for_status()
        return response.json()

    async def load_set(self, path: str) -> tuple[int, dict[str, Any]]:
        response = await self.http.post(
            "/v1/experts", json={"path": path}, headers=self._admin_headers()
        )
        return response.status_code, _json_or_text(response)

    async def retire_set(self, name: str) -> tuple[int, dict[str, Any]]:
        response = await self.http.delete(f"/v1/experts/{name}", headers=self._admin_headers())
        return response.status_code, _json_or_text(response)


def _json_or_text(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"text": response.text[:300]}
    return body if isinstance(body, dict) else {"body": body}
