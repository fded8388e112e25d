"""Metrics on Ray's Prometheus endpoint (`ray_` prefix), scraped as Prometheus would.

Replicas report every ~2 s (launcher's `metrics_report_interval_ms`), so every check polls.
"""

from __future__ import annotations

import pytest

from tests.integration.builders import save_random_set
from tests.integration.conftest import LM_NAME, wait_for

pytestmark = pytest.mark.integration

EXPORTED = (
    "ray_mora_requests_total",
    "ray_mora_request_latency_seconds_bucket",
    "ray_mora_time_to_first_token_seconds_bucket",
    "ray_mora_inter_token_latency_seconds_bucket",
    "ray_mora_prompt_tokens_total",
    "ray_mora_generation_tokens_total",
    "ray_mora_active_ranks_per_token_bucket",
    "ray_mora_pool_version",
    "ray_mora_pool_experts",
    "ray_mora_num_requests_running",
    "ray_mora_num_requests_waiting",
    "ray_mora_engine_step_seconds_bucket",
)


def test_metrics_are_exported(server) -> None:
    for _ in range(3):
        server.complete("hello world", 8)

    def exported() -> bool:
        names = set(server.metrics())
        return all(name in names for name in EXPORTED)

    wait_for(exported, f"all of {EXPORTED}", 60)
    completions = server.metric_sum(
        "ray_mora_requests_total", endpoint="/v1/completions", code="200"
    )
    assert completions >= 3
    generated = server.metric_sum("ray_mora_generation_tokens_total", model=LM_NAME)
    assert generated >= 24

    server.complete("hello world", 8)
    wait_for(
        lambda: (
            server.metric_sum("ray_mora_generation_tokens_total", model=LM_NAME) >= generated + 8
        ),
        "the token counter to move",
        60,
    )


def test_active_ranks_move_when_a_set_is_loaded_and_used(server, tiny_lm) -> None:
    """With an empty pool every token activates 0 ranks (histogram sum stays put); after a
    set is loaded and used the sum grows and the set's activations are counted."""
    server.retire_all()
    state = server.wait_converged()
    server.complete("the quick brown fox", 16)

    def ranks() -> tuple[float, float] | None:
        total = server.metric_sum("ray_mora_active_ranks_per_token_sum", model=LM_NAME)
        count = server.metric_sum("ray_mora_active_ranks_per_token_count", model=LM_NAME)
        return (total, count) if count else None

    before_sum, before_count = wait_for(ranks, "the active-ranks histogram", 60)

    save_random_set(tiny_lm.model, server.store_root / "metric-set", "metric-set", seed=7)
    response = server.load("metric-set")
    assert response.status_code == 200, response.text
    version = response.json()["version"]
    body = server.complete("the quick brown fox", 16)
    assert body["mora"]["pool_version"] == version
    assert body["mora"]["active_ranks_per_token"] > 0
    assert [s["name"] for s in body["mora"]["expert_sets"]] == ["metric-set"]

    def moved() -> bool:
        current = ranks()
        return current is not None and current[0] > before_sum and current[1] > before_count

    wait_for(moved, "mora_active_ranks_per_token to move", 60)
    wait_for(
        lambda: (
            (
                server.metric_sum("ray_mora_expert_set_activations_total", expert_set="metric-set")
                or 0
            )
            > 0
        ),
        "activations of metric-set",
        60,
    )
    wait_for(
        lambda: any(
            value == version
            for labels, value in server.metrics().get("ray_mora_pool_version", [])
            if labels.get("model") == LM_NAME
        ),
        "the new pool version on the gauge",
        60,
    )
    assert version > state["version"]
    server.retire_all()
