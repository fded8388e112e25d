"""`python -m loadtest observe`: the server plus a Prometheus scraping it, for a person to
look at. Prints the URLs; Ctrl-C stops both.

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

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = REPO / "deploy" / "serve.yaml"
SAMPLE_QUERIES = (
    "histogram_quantile(0.5, sum by (le) (rate(ray_mora_active_ranks_per_token_bucket[1m])))",
    "sum by (endpoint, code) (rate(ray_mora_requests_total[1m]))",
    "histogram_quantile(0.99, sum by (le) (rate(ray_mora_time_to_first_token_seconds_bucket[1m])))",
)


def observe(config_path: Path | None, prometheus_port: int, install: bool = True) -> int:
    from mora_runtime.cli import prepare_models
    from serving.cluster import launcher
    from serving.config import load_config

    try:
        binary = ensure_installed(install=install)
    except PrometheusUnavailable as exc:
        print(f"cannot start Prometheus: {exc}\n(as root: apt-get install -y prometheus)")
        return 1
    cfg = load_config(config_path or DEFAULT_CONFIG)
    prepare_models(
        lm=cfg.lm.enabled and cfg.lm.model_dir is None,
        clip=cfg.clip.enabled and cfg.clip.model_dir is None,
    )
    workdir = Path(tempfile.mkdtemp(prefix="mora-observe-"))
    prom = PrometheusServer(
        workdir,
        prometheus_port,
        render_config(f"127.0.0.1:{cfg.metrics_port}", scrape_interval="5s"),
        binary=binary,
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    started = False
    try:
        prom.start()
        started = True  # even a failed start leaves Ray processes to stop
        launcher.start(cfg)
        base = f"http://{cfg.host}:{cfg.port}"
        links = "\n".join(
            f"  {prom.url}/graph?g0.expr={urllib.parse.quote(q)}&g0.tab=0&g0.range_input=15m"
            for q in SAMPLE_QUERIES
        )
        print(
            f"MoRA Serve:  {base}/v1/completions  {base}/classify  {base}/v1/experts\n"
            f"metrics:     http://127.0.0.1:{cfg.metrics_port}/metrics\n"
            f"Prometheus:  {prom.url}  (config and data in {workdir})\n"
            f"try:\n{links}\n"
            f"Grafana:     import {REPO / 'deploy/grafana/mora.json'} with {prom.url} as the "
            f"data source\n"
            f"load:        python -m loadtest run --url {base} --duration 60 --concurrency 4 "
            f"--metrics-url http://127.0.0.1:{cfg.metrics_port}/metrics\n"
            "Ctrl-C stops the server and Prometheus.",
            flush=True,
        )
        done.wait()
    except PrometheusUnavailable as exc:
        print(f"Prometheus failed: {exc}")
        return 1
    finally:
        print("shutting down ...", flush=True)
        try:
            if started:
                launcher.stop()
        finally:
            prom.stop()
    return 0
