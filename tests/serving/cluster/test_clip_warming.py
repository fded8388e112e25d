"""A CLIP that is still warming up (its model directory not there yet) while the LM serves,
without Ray: the replica class itself (ClipServer run as a plain object, the registry sync
stubbed), the ingress backend over a fake handle, and the HTTP app over that backend.

Warming: /classify is a 503 with Retry-After and a message saying so, /health says the CLIP
is not ready; once the directory appears (renamed into place, as materialize does), the
replica loads it and both change.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serving.cluster import deployments, ingress, replica_base
from serving.cluster.protocol import WARMING_RETRY_AFTER_S, HotLoadOp, Refusal, ReplicaReport
from serving.config import ServerConfig
from serving.http.backend import ClassifyResult
from serving.http.errors import ServiceUnavailable
from tests.serving import fakes
from tests.serving.conftest import assert_openai_error, make_app


def png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# ----------------------------------------------------------------- the ingress and the app
class _Results:
    def __init__(self, answers: list[Any], delay_s: float) -> None:
        self.answers, self.delay_s = answers, delay_s

    async def results_async(self, return_exceptions: bool = False) -> list[Any]:
        await asyncio.sleep(self.delay_s)
        return list(self.answers)


class WarmingHandle:
    """The CLIP deployment's handle: its replicas answer as warming until `loaded`."""

    def __init__(self, replicas: int = 1, answer_delay_s: float = 0.0) -> None:
        self.loaded = [False] * replicas
        self.answer_delay_s = answer_delay_s
        self.readiness_queries = 0
        self.classify = self

    def broadcast(self, method: str) -> _Results:
        assert method == "is_ready"
        self.readiness_queries += 1
        return _Results(list(self.loaded), self.answer_delay_s)

    async def remote(self, images: list, labels: list[str] | None, mora: Any) -> Any:
        if not all(self.loaded):
            return Refusal.warming("the CLIP model 'fake-clip'")
        return ClassifyResult(("a", "b"), ((0.75, 0.25),) * len(images), pool_version=0)


def test_the_ingress_turns_a_warming_refusal_into_a_503_with_retry_after() -> None:
    handle = WarmingHandle()
    backend = ingress.RayClipBackend(handle, "fake-clip")
    with pytest.raises(ServiceUnavailable) as info:
        asyncio.run(backend.classify([], None, None))
    error = info.value
    assert error.status == 503 and error.code == "model_warming"
    assert error.headers == {"Retry-After": str(WARMING_RETRY_AFTER_S)}
    assert "warming up" in error.message and "retry" in error.message
    handle.loaded = [True]
    assert asyncio.run(backend.classify([object()], None, None)).labels == ("a", "b")


def test_readiness_needs_every_replica_and_is_not_asked_again_once_true() -> None:
    handle = WarmingHandle(replicas=2)
    backend = ingress.RayClipBackend(handle, "fake-clip")
    assert asyncio.run(backend.ready()) is False
    handle.loaded = [True, False]
    assert asyncio.run(backend.ready()) is False
    handle.loaded = [True, True]
    assert asyncio.run(backend.ready()) is True
    queries = handle.readiness_queries
    assert asyncio.run(backend.ready()) is True
    assert handle.readiness_queries == queries  # warming is over: /health stays cheap
    handle.loaded = []
    assert asyncio.run(ingress.RayClipBackend(handle, "x").ready()) is False  # no replica


def test_a_replica_that_does_not_answer_in_time_is_not_ready(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ingress, "READY_TIMEOUT_S", 0.05)
    handle = WarmingHandle(answer_delay_s=30.0)
    handle.loaded = [True]
    assert asyncio.run(ingress.RayClipBackend(handle, "fake-clip").ready()) is False


def test_the_app_serves_completions_while_the_clip_warms_then_classifies() -> None:
    handle = WarmingHandle()
    app = make_app(fakes.FakeLM(), ingress.RayClipBackend(handle, "fake-clip"))
    body = {"images": [png()], "labels": ["a", "b"]}
    with TestClient(app) as client:
        completion = {"model": "fake-lm", "prompt": "hi", "max_tokens": 2}
        assert client.post("/v1/completions", json=completion).status_code == 200
        response = client.post("/classify", json=body)
        error = assert_openai_error(response, 503)
        assert error["code"] == "model_warming" and "warming up" in error["message"]
        assert response.headers["Retry-After"] == str(WARMING_RETRY_AFTER_S)
        health = client.get("/health")
        assert health.status_code == 200
        assert health.json()["ready"] == {"fake-lm": True, "fake-clip": False}

        handle.loaded = [True]
        assert client.post("/classify", json=body).status_code == 200
        assert client.get("/health").json()["ready"] == {"fake-lm": True, "fake-clip": True}


# ----------------------------------------------------------------- the replica itself
@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.integration.builders import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture
def replica_cls(monkeypatch: pytest.MonkeyPatch) -> type:
    """ClipServer as a plain class; the registry sync (a Ray actor) records its store."""

    async def start_sync(self: Any, store: str) -> None:
        self.synced_with = store

    monkeypatch.setattr(replica_base.ReplicaBase, "_start_sync", start_sync)
    monkeypatch.setattr(deployments, "WARM_POLL_S", 0.01)
    return deployments.ClipServer.func_or_class


def config(tmp_path: Path, model_dir: Path) -> dict[str, Any]:
    cfg = {"expert_store": str(tmp_path / "store"), "clip": {"model_dir": str(model_dir)}}
    return ServerConfig.model_validate(cfg).resolved().model_dump()


async def start(cls: type, cfg: dict[str, Any]) -> Any:
    replica = cls.__new__(cls)
    await asyncio.wait_for(replica.__init__(cfg), 60)
    return replica


async def until(condition: Any, what: str, timeout_s: float = 60.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


def put_in_place(source: Path, target: Path) -> None:
    """As materialize does: a full copy beside the target, then one rename."""
    staging = target.parent / f".{target.name}.tmp"
    shutil.copytree(source, staging)
    staging.rename(target)


def test_a_replica_without_its_directory_starts_warming_and_loads_it_when_it_appears(
    replica_cls: type, tiny_clip_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "clip"

    async def scenario() -> None:
        replica = await start(replica_cls, config(tmp_path, target))
        assert replica.warming is not None and not await replica.is_ready()
        refusal = await replica.classify([], None, None)
        assert isinstance(refusal, Refusal) and refusal.kind == "warming"
        op = HotLoadOp.load("s", "clip", str(tmp_path / "store" / "s"), 2)
        # Every hot-load step is refused the same way (the coordinator answers 503).
        for answer in (
            await replica.prepare(op),
            await replica.commit(op, None),
            await replica.abort(op.op_id),
            await replica.sync(None),
            await replica.describe_pool(),
        ):
            assert answer == refusal
        await replica.check_health()  # warming is healthy

        put_in_place(tiny_clip_dir, target)
        await until(lambda: replica.warming is None, "the replica to load the directory")
        assert await replica.is_ready()
        assert replica.synced_with == str(tmp_path / "store")  # caught up with the registry
        # What `classify` batches (Serve's batching needs a running replica context).
        request = ([Image.new("RGB", (32, 32))], ["cat", "dog"], None)
        loop = asyncio.get_running_loop()
        [result] = await loop.run_in_executor(replica._torch, replica._run_batch, [request])
        assert isinstance(result, ClassifyResult) and result.labels == ("cat", "dog")
        assert isinstance(await replica.abort("nothing-staged"), ReplicaReport)
        await replica.check_health()

    asyncio.run(scenario())


def test_a_replica_that_finds_its_directory_loads_before_it_starts(
    replica_cls: type, tiny_clip_dir: Path, tmp_path: Path
) -> None:
    async def scenario() -> None:
        replica = await start(replica_cls, config(tmp_path, tiny_clip_dir))
        assert replica.warming is None and await replica.is_ready()
        assert replica.synced_with == str(tmp_path / "store")

    asyncio.run(scenario())


def test_a_directory_that_appears_broken_fails_the_health_check(
    replica_cls: type, tmp_path: Path
) -> None:
    target = tmp_path / "clip"

    async def scenario() -> None:
        replica = await start(replica_cls, config(tmp_path, target))
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "config.json").write_text(json.dumps({"model_type": "nothing-real"}))
        put_in_place(broken, target)
        await until(lambda: replica.load_error is not None, "the load to fail")
        with pytest.raises(RuntimeError, match="failed to load"):
            await replica.check_health()  # Serve replaces it; the new one loads at start
        assert isinstance(await replica.classify([], None, None), Refusal)

    asyncio.run(scenario())
