"""`python -m loadtest observe`: the server plus a Prometheus scraping it, for a person to
look at. Prints the URLs; Ctrl-C stops both.

The server is `mora serve --config CONFIG` run as a subprocess (loadtest/server_process.py);
its ports come from the config file itself.

Prometheus is Debian's `prometheus` package (installed on the fly when running as root);
its config is deploy/prometheus.yml pointed at the server's metrics port. Grafana is not
started: import deploy/grafana/mora.json into any Grafana and add this Prometheus as its
data source.
"""

from __future__ import annotations

import logging
import signal
import tempfile
import threading
import urllib.parse
from pathlib import Path

from loadtest.prometheus import (
    REPO,
    PrometheusServer,
    PrometheusUnavailable,
    ensure_installed,
    render_config,
)
from loadtest.server_process import (
    MoraCommandError,
    ServerProcess,
    find_mora,
    read_addresses,
)

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = REPO / "deploy" / "serve.yaml"
# Covers `mora serve` preparing the default models on a first run, then starting Ray.
SERVER_START_TIMEOUT_S = 1800.0
SAMPLE_QUERIES = (
    "histogram_quantile(0.5, sum by (le) (rate(ray_mora_active_ranks_per_token_bucket[1m])))",
    "sum by (endpoint, code) (rate(ray_mora_requests_total[1m]))",
    "histogram_quantile(0.99, sum by (le) (rate(ray_mora_time_to_first_token_seconds_bucket[1m])))",
)


def observe(
    config_path: Path | None,
    prometheus_port: int,
    install: bool = True,
    *,
    mora: str | None = None,
    start_timeout_s: float = SERVER_START_TIMEOUT_S,
) -> int:
    config_path = config_path or DEFAULT_CONFIG
    try:
        binary = ensure_installed(install=install)
    except PrometheusUnavailable as exc:
        print(f"cannot start Prometheus: {exc}\n(as root: apt-get install -y prometheus)")
        return 1
    try:
        command = find_mora(mora)
        addresses = read_addresses(config_path)
    except (MoraCommandError, OSError, ValueError) as exc:
        print(f"cannot start the server: {exc}")
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="mora-observe-"))
    prom = PrometheusServer(
        workdir,
        prometheus_port,
        render_config(f"127.0.0.1:{addresses.metrics_port}", scrape_interval="5s"),
        binary=binary,
    )
    server = ServerProcess(command, config_path, addresses)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        prom.start()
        # `mora serve` prepares the default models the config uses, then starts Ray and Serve.
        server.start()
        if not server.wait_healthy(start_timeout_s, cancel=done):
            return 0  # Ctrl-C before the server was up
        base = addresses.base_url
        links = "\n".join(
            f"  {prom.url}/graph?g0.expr={urllib.parse.quote(q)}&g0.tab=0&g0.range_input=15m"
            for q in SAMPLE_QUERIES
        )
        print(
            f"MoRA Serve:  {base}/v1/completions  {base}/classify  {base}/v1/experts\n"
            f"metrics:     {addresses.metrics_url}\n"
            f"Prometheus:  {prom.url}  (config and data in {workdir})\n"
            f"try:\n{links}\n"
            f"Grafana:     import {REPO / 'deploy/grafana/mora.json'} with {prom.url} as the "
            f"data source\n"
            f"load:        python -m loadtest run --url {base} --duration 60 --concurrency 4 "
            f"--metrics-url {addresses.metrics_url}\n"
            "Ctrl-C stops the server and Prometheus.",
            flush=True,
        )
        while not done.wait(0.5):  # a timed wait lets the signal handlers run promptly
            if server.process is not None and server.process.poll() is not None:
                print(f"the server exited with code {server.process.returncode}")
                return 1
    except (PrometheusUnavailable, MoraCommandError) as exc:
        print(f"observe failed: {exc}")
        return 1
    finally:
        print("shutting down ...", flush=True)
        try:
            server.stop()
        finally:
            prom.stop()
    return 0
