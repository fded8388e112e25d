"""`mora serve`: start a local Ray (loopback only), deploy the application, wait for Ctrl-C."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from pathlib import Path

from serving.config import APP_NAME, ServerConfig, load_config

logger = logging.getLogger(__name__)


def start(cfg: ServerConfig) -> None:
    """Start Ray and Serve in this process and deploy the app (returns once it is ready)."""
    # Keep every Ray socket on 127.0.0.1 (must be set before Ray starts its processes).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    from serving.cluster import proxy_gate
    from serving.cluster.deployments import build_app

    # Ray's processes inherit this environment when ray.init starts them: every proxy then
    # runs the gate (or, configured by an earlier start in this process, no longer does).
    proxy_gate.configure(os.environ, cfg.limits.refuse_at_proxy, cfg.api_token)

    Path(cfg.expert_store).mkdir(parents=True, exist_ok=True)
    ray.init(
        include_dashboard=False,
        namespace="mora",
        _metrics_export_port=cfg.metrics_port,
        # Ray starts its workers at niceness 15, below its own daemons and every other
        # process; a replica is the server's whole workload, and its torch threads meet at
        # barriers each product, so any preemption stalls them all: serve at normal priority.
        _system_config={"metrics_report_interval_ms": 2000, "worker_niceness": 0},
        logging_level=logging.WARNING,
    )
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg.model_dump()), name=APP_NAME, route_prefix="/", blocking=False)


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def run(config_path: Path | None) -> int:
    """Serve until SIGINT/SIGTERM; the console's Ctrl-C shuts everything down cleanly."""
    cfg = load_config(config_path)
    if cfg.admin_token is None:
        logger.warning("MORA_ADMIN_TOKEN is not set: /v1/experts refuses every request (401)")
    try:
        start(cfg)
    except Exception as exc:
        logger.error("the application failed to start: %s", exc)
        stop()
        return 1
    base = f"http://{cfg.host}:{cfg.port}"
    print(
        f"MoRA Serve is up: {base}/v1/completions, {base}/classify, {base}/v1/experts\n"
        f"Prometheus metrics: http://127.0.0.1:{cfg.metrics_port}/metrics\n"
        f"Expert store: {cfg.expert_store}\nCtrl-C stops the server.",
        flush=True,
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(0.5):  # a timed wait lets the signal handlers run promptly
        pass
    print("shutting down ...", flush=True)
    stop()
    return 0


def free_ports(count: int) -> list[int]:
    """Loopback ports nobody listens on right now (all probed before any is released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
