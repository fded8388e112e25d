"""Run a real Prometheus (Debian's `prometheus` package) on loopback, and query it.

Used by `python -m loadtest observe` and by the integration test that evaluates every
Grafana panel's PromQL. The scrape config is deploy/prometheus.yml with its target pointed
at the server's metrics port.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DEPLOY_CONFIG = REPO / "deploy" / "prometheus.yml"


class PrometheusUnavailable(RuntimeError):
    """The binary is missing and could not be installed, or the server did not start."""


def ensure_installed(*, install: bool = True) -> str:
    """Path of the `prometheus` binary; installs Debian's package (as root) if missing."""
    found = shutil.which("prometheus")
    if found or not install:
        if not found:
            raise PrometheusUnavailable("`prometheus` is not installed")
        return found
    if shutil.which("apt-get") is None:
        raise PrometheusUnavailable("`prometheus` is missing and apt-get is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"],
    )
    for cmd in steps:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise PrometheusUnavailable(
                f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}"
                f"\n{done.stderr[-2000:]}"
            )
    found = shutil.which("prometheus")
    if not found:
        raise PrometheusUnavailable("apt-get installed `prometheus` but it is not on PATH")
    return found


def render_config(
    metrics_target: str,
    *,
    scrape_interval: str | None = None,
    service_discovery: bool = True,
    template: Path = DEPLOY_CONFIG,
) -> str:
    """deploy/prometheus.yml with the `mora` job scraping `metrics_target` (host:port)."""
    config = yaml.safe_load(template.read_text())
    jobs = config["scrape_configs"]
    for job in jobs:
        if job["job_name"] == "mora":
            job["static_configs"] = [{"targets": [metrics_target]}]
    if not service_discovery:
        config["scrape_configs"] = [j for j in jobs if "file_sd_configs" not in j]
    if scrape_interval:
        config["global"]["scrape_interval"] = scrape_interval
        config["global"]["evaluation_interval"] = scrape_interval
    return yaml.safe_dump(config, sort_keys=False)


class PrometheusServer:
    """One Prometheus process with its own config and storage under `workdir`."""

    def __init__(self, workdir: Path, port: int, config_text: str, binary: str | None = None):
        self.workdir = Path(workdir)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.binary = binary or ensure_installed()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(config_text)
        self.log_path = self.workdir / "prometheus.log"
        self.process: subprocess.Popen | None = None

    def _spawn(self, log) -> subprocess.Popen:
        return subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1d",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in `observe` reaches us first; we stop it
        )

    def start(self, timeout_s: float = 60.0) -> None:
        with open(self.log_path, "w") as log:  # the child keeps its own copy of the fd
            self.process = self._spawn(log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PrometheusUnavailable(f"prometheus exited: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise PrometheusUnavailable(f"prometheus not ready after {timeout_s:g} s")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text()[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; raises `PromQLError` on an error answer."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        response = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=30.0)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise PromQLError(f"{expr}: {body.get('errorType')}: {body.get('error')}")
        data = body["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def targets_up(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/targets", timeout=10.0)
        return response.json()["data"]["activeTargets"]


class PromQLError(RuntimeError):
    pass
