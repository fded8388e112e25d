"""Every metric of the server, declared once, with units in the names and explicit buckets.

Inside Ray Serve the metrics are `ray.serve.metrics` objects: each replica reports to Ray's
Prometheus endpoint (names gain a `ray_` prefix and `application`/`deployment`/`replica`
tags, so replicas sum). A `prometheus_client` registry inside a replica would not be
exported. Labels are bounded: model names and module kinds come from the config, endpoints
from a fixed list, status codes are numbers, and expert-set names are capped by the pool.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

from ray.serve import metrics as ray_metrics

from mora_runtime.experts.stats import SequenceRouting

ENDPOINTS = ("/v1/completions", "/v1/models", "/classify", "/v1/experts", "/health", "other")

# Ray needs positive boundaries: the first bucket (<= 0.1) holds the tokens with no expert.
ACTIVE_RANK_BUCKETS = [0.1, 0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 25, 32, 48, 64]
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 60]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1]
LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300]
LOAD_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30]
STEP_BUCKETS = [0.002, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1, 5]


class ServerMetrics:
    """The metric objects of one process (create lazily: Ray must be initialised)."""

    def __init__(self) -> None:
        m = ray_metrics
        self.active_ranks = m.Histogram(
            "mora_active_ranks_per_token",
            description="Experts active per token, mean over the adapted layers of a kind.",
            boundaries=ACTIVE_RANK_BUCKETS,
            tag_keys=("model", "module_kind"),
        )
        self.pool_experts = m.Gauge(
            "mora_pool_experts", description="Rank-1 experts in the pool.", tag_keys=("model",)
        )
        self.pool_version = m.Gauge(
            "mora_pool_version", description="Pool version being served.", tag_keys=("model",)
        )
        self.set_activations = m.Counter(
            "mora_expert_set_activations_total",
            description="(token, layer, expert) activations per expert set.",
            tag_keys=("model", "expert_set"),
        )
        self.ttft = m.Histogram(
            "mora_time_to_first_token_seconds",
            description="Time from request arrival to its first generated token.",
            boundaries=TTFT_BUCKETS,
            tag_keys=("model",),
        )
        self.itl = m.Histogram(
            "mora_inter_token_latency_seconds",
            description="Time between consecutive generated tokens of a request.",
            boundaries=ITL_BUCKETS,
            tag_keys=("model",),
        )
        self.request_latency = m.Histogram(
            "mora_request_latency_seconds",
            description="End-to-end latency per endpoint.",
            boundaries=LATENCY_BUCKETS,
            tag_keys=("endpoint",),
        )
        self.requests = m.Counter(
            "mora_requests_total",
            description="Requests by endpoint and HTTP status code.",
            tag_keys=("endpoint", "code"),
        )
        self.prompt_tokens = m.Counter(
            "mora_prompt_tokens_total", description="Prompt tokens processed.", tag_keys=("model",)
        )
        self.generation_tokens = m.Counter(
            "mora_generation_tokens_total",
            description="Tokens generated.",
            tag_keys=("model",),
        )
        self.step_seconds = m.Histogram(
            "mora_engine_step_seconds",
            description="Duration of one engine step (a prefill of the admitted prompts, or a "
            "decode of every running sequence).",
            boundaries=STEP_BUCKETS,
            tag_keys=("model", "phase"),
        )
        self.running = m.Gauge(
            "mora_num_requests_running",
            description="Sequences in the running batch.",
            tag_keys=("model",),
        )
        self.waiting = m.Gauge(
            "mora_num_requests_waiting",
            description="Requests queued for admission.",
            tag_keys=("model",),
        )
        self.replica_rss = m.Gauge(
            "mora_replica_rss_bytes",
            description="Resident memory of a model replica's process (/proc/self/statm).",
            tag_keys=("model",),
        )
        self.load_seconds = m.Histogram(
            "mora_expert_set_load_seconds",
            description="Duration of hot-load / retire operations across replicas.",
            boundaries=LOAD_BUCKETS,
        )
        self.loads = m.Counter(
            "mora_expert_set_loads_total",
            description="Hot-load / retire operations by result.",
            tag_keys=("result",),
        )

    # ------------------------------------------------------------- runtime side
    def observe_routing(self, model: str, per_token: Mapping[str, tuple[float, ...]]) -> None:
        for kind, values in per_token.items():
            tags = {"model": model, "module_kind": kind}
            for value in values:
                self.active_ranks.observe(value, tags=tags)

    def observe_step(self, model: str, seconds: float, prefill: bool) -> None:
        phase = "prefill" if prefill else "decode"
        self.step_seconds.observe(seconds, tags={"model": model, "phase": phase})

    def count_set_activations(self, model: str, routing: SequenceRouting) -> None:
        for name, count in routing.set_activations.items():
            self.set_activations.inc(count, tags={"model": model, "expert_set": name})

    def set_pool(self, model: str, experts: int, version: int) -> None:
        self.pool_experts.set(experts, tags={"model": model})
        self.pool_version.set(version, tags={"model": model})

    def set_queue(self, model: str, running: int, waiting: int) -> None:
        self.running.set(running, tags={"model": model})
        self.waiting.set(waiting, tags={"model": model})

    def set_rss(self, model: str) -> None:
        rss = process_rss_bytes()
        if rss is not None:
            self.replica_rss.set(rss, tags={"model": model})


def process_rss_bytes() -> int | None:
    """This process's resident set size now (not the peak `getrusage` reports); None where
    /proc is absent."""
    try:
        with open("/proc/self/statm") as fh:
            resident_pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


@functools.cache
def server_metrics() -> ServerMetrics:
    return ServerMetrics()


class RayMetricsHook:
    """`serving.http.backend.MetricsHook` for the ingress: maps app events onto the metrics."""

    def __init__(self) -> None:
        self.m = server_metrics()

    def request_finished(self, endpoint: str, code: int, seconds: float) -> None:
        endpoint = endpoint if endpoint in ENDPOINTS else "other"
        self.m.requests.inc(tags={"endpoint": endpoint, "code": str(code)})
        self.m.request_latency.observe(seconds, tags={"endpoint": endpoint})

    def first_token(self, model: str, seconds: float) -> None:
        self.m.ttft.observe(seconds, tags={"model": model})

    def inter_token(self, model: str, seconds: float) -> None:
        self.m.itl.observe(seconds, tags={"model": model})

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        if prompt:
            self.m.prompt_tokens.inc(prompt, tags={"model": model})
        if completion:
            self.m.generation_tokens.inc(completion, tags={"model": model})

    def routing(self, model: str, routing: SequenceRouting) -> None:
        self.m.count_set_activations(model, routing)

    def expert_load(self, seconds: float, result: str) -> None:
        self.m.load_seconds.observe(seconds)
        self.m.loads.inc(tags={"result": result})
