"""Integration tier: one real local Ray Serve on loopback for the whole run, tiny models.

`ServeCluster` owns that one instance: free ports for HTTP and metrics, a temporary expert
store, Ray + Serve started through `serving.cluster.launcher.start` and stopped through
`serving.cluster.launcher.stop`, then a check that no process of that Ray session is left.
Tests that need another configuration redeploy the "mora" application
(`ServeCluster.deploy`) instead of restarting Ray. tests/slow shares the class
(`acquire`/`release` are counted), so one pytest run never starts two Ray instances.

The tiny LM is the fixture Llama of tests/conftest.py with two changes that keep its weights'
fingerprint: a 32k context and an end-of-sequence logit pinned to 0 (lm_head row zeroed),
so greedy streams run exactly `max_tokens` tokens and a stream can last as long as a test
needs. Timings are logged, never asserted: test machines are shared and drift.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import httpx
import pytest

from serving.cluster.launcher import free_ports
from serving.config import APP_NAME, ServerConfig
from tests.integration.builders import (
    save_tiny_clip,
    save_tiny_lm,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

ADMIN_TOKEN = "integration-admin"
LM_NAME = "tiny-llama"
CLIP_NAME = "tiny-clip"


# ---------------------------------------------------------------------------- polling


def wait_for(
    probe: Callable[[], T], what: str, timeout_s: float = 60.0, interval_s: float = 0.5
) -> T:
    """Call `probe` until it returns something truthy; fail naming `what` after the timeout."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = probe()
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what} (last: {last!r})")
        time.sleep(interval_s)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(out.get(key), dict) else value
    return out


# ---------------------------------------------------------------------------- the cluster


class ServeCluster:
    """The process's one local Ray + Serve instance and the "mora" app deployed on it."""

    _current: ClassVar[ServeCluster | None] = None

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mora-it-"))
        self.http_port, self.metrics_port = free_ports(2)
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.cfg: ServerConfig | None = None
        self.session_name: str | None = None
        self.users = 0
        self.http = httpx.Client(base_url=self.base_url, timeout=120.0)

    # ----------------------------------------------------------------- lifetime
    @classmethod
    def acquire(cls) -> ServeCluster:
        if cls._current is None:
            cls._current = cls()
        cls._current.users += 1
        return cls._current

    def release(self) -> None:
        self.users -= 1
        if self.users > 0:
            return
        ServeCluster._current = None
        try:
            self._stop()
        finally:
            self.http.close()
            shutil.rmtree(self.root, ignore_errors=True)

    def _stop(self) -> None:
        from serving.cluster import launcher

        if self.cfg is None:
            return
        started = time.perf_counter()
        launcher.stop()
        logger.info("Ray + Serve stopped in %.1f s", time.perf_counter() - started)
        if self.session_name:
            # Every process of the session names it on its command line (raylet, GCS,
            # agents, workers): none may outlive the shutdown.
            wait_for(
                lambda: not _pids(self.session_name), f"the processes of {self.session_name}", 30
            )
            assert not _pids(f"raylet.*{self.session_name}")

    # ----------------------------------------------------------------- config
    def store(self, name: str = "store") -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def config(self, store: str = "store", **fields: Any) -> ServerConfig:
        """A config on this cluster's ports and store; `fields` merge into it (nested)."""
        base = {
            "host": "127.0.0.1",
            "port": self.http_port,
            "metrics_port": self.metrics_port,
            "expert_store": str(self.store(store)),
            "admin_token": ADMIN_TOKEN,
            "lm": {"num_cpus": 0},  # the ingress reserves a CPU; the replicas share the rest
            "clip": {"num_cpus": 0},
        }
        return ServerConfig.model_validate(_merge(base, fields)).resolved()

    @property
    def store_root(self) -> Path:
        assert self.cfg is not None
        return Path(self.cfg.expert_store)

    def deploy(self, cfg: ServerConfig) -> None:
        """Make `cfg` the running app: start Ray the first time, redeploy when it differs."""
        import ray
        from ray import serve

        from serving.cluster import launcher
        from serving.cluster.deployments import build_app

        if cfg == self.cfg:
            return
        started = time.perf_counter()
        if self.cfg is None:
            try:
                launcher.start(cfg)
            finally:
                self.cfg = cfg  # even half-started, `release` must stop it
                self.session_name = _session_name() if ray.is_initialized() else None
        else:
            if cfg.expert_store != self.cfg.expert_store:
                self._drop_registry()
            serve.run(build_app(cfg.model_dump()), name=APP_NAME, route_prefix="/")
            self.cfg = cfg
        wait_for(lambda: self.http.get("/health").status_code == 200, "/health", 120)
        logger.info("deployed %s in %.1f s", cfg.lm.model_dir, time.perf_counter() - started)

    def _drop_registry(self) -> None:
        """Another expert store: the registry actor is per cluster, so retire it first."""
        import ray
        from ray import serve

        from serving.cluster.registry import ACTOR_NAME, NAMESPACE

        serve.delete(APP_NAME)
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(ACTOR_NAME, namespace=NAMESPACE), no_restart=True)

        def gone() -> bool:
            try:
                ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
            except ValueError:
                return True
            return False

        wait_for(gone, "the old registry actor to go away", 30)

    # ----------------------------------------------------------------- clients
    def openai(self, **kwargs: Any):
        import openai

        kwargs.setdefault("max_retries", 0)  # a 503 must reach the test, not be retried
        kwargs.setdefault("timeout", 120.0)
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", **kwargs)

    def admin(self, method: str, path: str = "/v1/experts", **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        return self.http.request(method, path, headers=headers, **kwargs)

    def experts(self) -> dict[str, Any]:
        response = self.admin("GET")
        assert response.status_code == 200, response.text
        return response.json()

    def load(self, path: str) -> httpx.Response:
        return self.admin("POST", json={"path": path})

    def retire_all(self) -> None:
        for entry in self.experts()["sets"]:
            response = self.admin("DELETE", f"/v1/experts/{entry['name']}")
            assert response.status_code == 200, response.text

    def wait_converged(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Wait until every replica serves the registry's version and sets; returns GET
        /v1/experts at that point."""
        assert self.cfg is not None
        wanted_replicas = {
            "causal_lm": self.cfg.lm.replicas if self.cfg.lm.enabled else 0,
            "clip": self.cfg.clip.replicas if self.cfg.clip.enabled else 0,
        }

        def converged() -> dict[str, Any] | None:
            response = self.admin("GET")
            if response.status_code != 200:  # e.g. while the registry actor restarts
                return None
            state = response.json()
            for kind, count in wanted_replicas.items():
                replicas = state["replicas"].get(kind, [])
                names = sorted(s["name"] for s in state["sets"] if s["model_kind"] == kind)
                if len(replicas) != count or any(
                    r["pool_version"] != state["version"]
                    or sorted(s["name"] for s in r["sets"]) != names
                    for r in replicas
                ):
                    return None
            return state

        return wait_for(converged, "every replica to serve the committed pool", timeout_s)

    def complete(self, prompt: str | list[int], max_tokens: int, **fields: Any) -> dict:
        """A greedy, non-streamed completion; returns the JSON body (asserting a 200)."""
        body = {"model": LM_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        response = self.http.post("/v1/completions", json=body | fields)
        assert response.status_code == 200, response.text
        return response.json()

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """Sample name -> [(labels, value)] from Ray's Prometheus endpoint."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.metrics_url, timeout=30).text
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append((sample.labels, sample.value))
        return samples

    def metric_sum(self, name: str, **labels: str) -> float | None:
        """Sum over the series of `name` matching `labels`; None while none is exported."""
        series = [
            value
            for sample_labels, value in self.metrics().get(name, [])
            if all(sample_labels.get(k) == v for k, v in labels.items())
        ]
        return math.fsum(series) if series else None


def _session_name() -> str | None:
    import ray

    node = getattr(ray._private.worker.global_worker, "node", None)  # no public accessor
    return getattr(node, "session_name", None)


def _pids(pattern: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False)
    return out.stdout.split()


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def cluster() -> Iterator[ServeCluster]:
    serve_cluster = ServeCluster.acquire()
    try:
        yield serve_cluster
    finally:
        serve_cluster.release()


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="session")
def tiny_lm(tiny_lm_dir):
    """The same LM loaded in the test process: the greedy reference and set fingerprints."""
    from mora_runtime.models.lm import load_causal_lm

    return load_causal_lm(tiny_lm_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_dir):
    from mora_runtime.models.clip_loading import load_clip

    return load_clip(tiny_clip_dir, device="cpu")


@pytest.fixture(scope="session")
def main_config(cluster, tiny_lm_dir, tiny_clip_dir) -> ServerConfig:
    """Two LM replicas and one CLIP replica: what most integration tests run against."""
    return cluster.config(
        lm={
            "model_dir": str(tiny_lm_dir),
            "served_name": LM_NAME,
            "replicas": 2,
            "torch_threads": 1,  # two replicas share the cores; tiny matmuls gain nothing more
        },
        clip={"model_dir": str(tiny_clip_dir), "served_name": CLIP_NAME},
    )


@pytest.fixture(scope="module")
def server(cluster, main_config) -> ServeCluster:
    cluster.deploy(main_config)
    return cluster
