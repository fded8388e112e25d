"""A real Prometheus scrapes the real server; every Grafana panel's PromQL returns data.

Prometheus is Debian's `prometheus` package: installed here with apt-get when missing (CI
runs as root on a fresh machine). No apt, or a failed install, FAILS this test: a skipped
dashboard check would pass silently on exactly the machines that never ran it.

The server is the integration tier's shared one (`server` fixture of conftest.py: one Ray
instance per pytest run, tiny LM x2 replicas + tiny CLIP); the load is the load generator
itself (`loadtest.runner`), with the hot-load scenario so expert-set metrics exist, and its
report must show no failed request and no response mixing pool versions.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from loadtest.metrics import RequestRecord
from loadtest.prometheus import (
    DEPLOY_CONFIG,
    PrometheusServer,
    PrometheusUnavailable,
    PromQLError,
    ensure_installed,
    render_config,
)
from loadtest.report import build_summary
from loadtest.runner import RunConfig, run
from loadtest.workload import Dist
from tests.integration.builders import save_random_set
from tests.integration.conftest import ADMIN_TOKEN, free_ports, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "mora.json"
# Grafana resolves these before a query reaches Prometheus; 1m covers the load just sent.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "15m"}
LOAD_S = 12.0


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = [
        (f"{panel['title']} [{target['refId']}]", target["expr"])
        for panel in dash["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]
    out += [(f"annotation {a['name']}", a["expr"]) for a in dash["annotations"]["list"]]
    resolved = []
    for title, expr in out:
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{title}: unresolved variable in {expr!r}"
        resolved.append((title, expr))
    return resolved


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    try:
        binary = ensure_installed(install=True)
    except PrometheusUnavailable as exc:
        pytest.fail(f"Prometheus is required for this test and could not be installed: {exc}")
    promtool = Path(binary).with_name("promtool")
    if promtool.exists():  # the shipped config itself is valid (a missing SD file only warns)
        check = subprocess.run(
            [str(promtool), "check", "config", str(DEPLOY_CONFIG)], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
    (port,) = free_ports(1)
    config = render_config(
        f"127.0.0.1:{server.metrics_port}", scrape_interval="1s", service_discovery=False
    )
    prom = PrometheusServer(tmp_path_factory.mktemp("prometheus"), port, config, binary=binary)
    prom.start()
    try:
        yield prom
    finally:
        prom.stop()


def test_every_dashboard_panel_has_data(server, prometheus, tiny_lm, tmp_path) -> None:
    wait_for(
        lambda: any(t["health"] == "up" for t in prometheus.targets_up()),
        "Prometheus to scrape the server",
        60,
    )
    server.retire_all()
    state = server.wait_converged()
    names = [f"prom-set-{i}" for i in range(2)]
    for i, name in enumerate(names):
        save_random_set(tiny_lm.model, server.store_root / name, name, seed=100 + i)

    cfg = RunConfig(
        url=server.base_url,
        duration_s=LOAD_S,
        warmup_s=1.0,
        mix={"completions": 0.5, "stream": 0.35, "classify": 0.15},
        prompt_len=Dist.parse("uniform:4,16"),
        max_tokens=Dist.parse("uniform:4,16"),
        concurrency=3,
        seed=5,
        metrics_url=server.metrics_url,
        settle_s=3.0,
        admin_token=ADMIN_TOKEN,
        hotload_paths=tuple(names),
        hotload_every_s=LOAD_S / 3,
        request_timeout_s=60,
        drain_timeout_s=60,
    )
    result = asyncio.run(run(cfg))
    summary = build_summary(result)
    kinds = {r.kind for r in result.records if r.ok}
    assert kinds == {"completions", "stream", "classify"}, summary["errors"]
    hot = summary["hotload"]
    assert hot["loads_ok"] == 2 and len(hot["cleanup"]) == 2, hot["events"]
    assert hot["failed_requests"] == 0, summary["errors"]
    assert hot["mixed_version_responses"] == 0, hot["violations"]
    assert summary["mora"]["responses_with_mora"] > 0
    used = {name for r in result.records for name in r.expert_sets}
    assert used & set(names), "no response was served by a hot-loaded set"
    assert summary["server_metrics"]["available"], summary["server_metrics"]
    assert any(isinstance(r, RequestRecord) and r.first_text for r in result.records)
    assert server.experts()["version"] > state["version"]
    loaded_at = time.time()

    queries = dashboard_queries()
    missing: dict[str, str] = {}

    def all_have_data() -> bool:
        missing.clear()
        for title, expr in queries:
            try:
                rows = prometheus.query(expr)
            except PromQLError as exc:
                pytest.fail(f"{title}: Prometheus rejected the query: {exc}")
            if not rows:
                missing[title] = expr
        return not missing

    try:
        wait_for(all_have_data, "every dashboard query to return data", 90, interval_s=2)
    except pytest.fail.Exception:
        lines = "\n".join(f"  {t}: {e}" for t, e in missing.items())
        pytest.fail(
            f"{len(missing)} of {len(queries)} dashboard queries returned no data "
            f"{time.time() - loaded_at:.0f} s after the load:\n{lines}"
        )
    # The numbers behind the panels are the run's: spot-check two of them.
    ranks = prometheus.query("sum(ray_mora_active_ranks_per_token_sum) > 0")
    assert ranks, "no token was served by an expert"
    codes = prometheus.query('sum by (code) (ray_mora_requests_total{endpoint="/classify"})')
    assert {row["metric"]["code"] for row in codes} >= {"200"}
    assert re.fullmatch(r"\d+(\.\d+)?", codes[0]["value"][1])
