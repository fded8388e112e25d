"""The soak scenario: hours-style churn squeezed into minutes, with the replicas' memory watched.

Three things run at once for `duration_s`, against one server:
- steady traffic: `concurrency` closed-loop users sending the request mix;
- hot-load churn: every `churn_every_s` one admin operation, either loading the next set of a
  fixed cycle or, when `max_loaded` of ours are loaded, retiring the oldest (so set names
  recur and the pool stays small: what grows is what churn leaves behind, not the pool);
- disconnect storms: every `storm_every_s` (the first at half of it) `storm_size` streaming
  requests are opened at once and dropped as soon as their first text arrives.

Every `sample_every_s` the server's Prometheus endpoint is scraped for the replicas' resident
memory (`mora_replica_rss_bytes`, one series per replica) and Ray's per-component RSS where it
exports one. The load generator stays a client: HTTP only, no torch, no runtime.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadtest.client import LoadClient
from loadtest.hotload import timed_admin
from loadtest.metrics import HotLoadEvent, RequestRecord
from loadtest.workload import Dist, RequestFactory, make_prompt

logger = logging.getLogger(__name__)

REPLICA_RSS = "mora_replica_rss_bytes"
COMPONENT_RSS = "ray_component_rss_mb"  # Ray's reporter agent, per process name; MiB


class SoakPlanError(ValueError):
    """Settings that cannot make a soak plan (too few sets for the churn, ...)."""


@dataclass(frozen=True)
class SoakConfig:
    url: str
    metrics_url: str
    duration_s: float
    set_paths: tuple[str, ...]
    mix: dict[str, float]
    prompt_len: Dist
    max_tokens: Dist
    admin_token: str | None = None
    api_key: str | None = None
    model: str | None = None
    concurrency: int = 2
    temperature: float = 1.0
    seed: int = 0
    churn_every_s: float = 10.0
    max_loaded: int = 2
    storm_every_s: float = 60.0
    storm_size: int = 32
    storm_max_tokens: int = 64
    storm_patience_s: float = 60.0  # a storm stream with no text by then is dropped anyway
    sample_every_s: float = 5.0
    request_timeout_s: float = 120.0
    drain_timeout_s: float = 60.0
    max_requests: int = 100_000
    max_connections: int = 256
    progress: bool = True

    def describe(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("api_key", "admin_token")}
        out["prompt_len"] = str(self.prompt_len)
        out["max_tokens"] = str(self.max_tokens)
        out["set_paths"] = list(self.set_paths)
        return out


@dataclass(frozen=True)
class ChurnStep:
    at: float
    action: str  # load | retire
    path: str  # the set's directory in the store; a retire names the set loaded from it


def plan_churn(
    paths: tuple[str, ...] | list[str], every_s: float, duration_s: float, max_loaded: int
) -> list[ChurnStep]:
    """One operation at every_s, 2 * every_s, ... strictly before duration_s: load the next
    set of the cycle that is not loaded, or retire the oldest once `max_loaded` are."""
    if max_loaded < 1:
        raise SoakPlanError("max_loaded must be >= 1")
    if len(paths) <= max_loaded:
        raise SoakPlanError(
            f"the churn needs more sets than max_loaded ({max_loaded}): got {len(paths)}"
        )
    if every_s <= 0:
        raise SoakPlanError("the churn interval must be > 0")
    steps: list[ChurnStep] = []
    loaded: list[str] = []  # oldest first
    cursor = 0
    k = 1
    while k * every_s < duration_s:
        at = k * every_s
        if len(loaded) >= max_loaded:
            steps.append(ChurnStep(at, "retire", loaded.pop(0)))
        else:
            while paths[cursor % len(paths)] in loaded:
                cursor += 1
            path = paths[cursor % len(paths)]
            cursor += 1
            loaded.append(path)
            steps.append(ChurnStep(at, "load", path))
        k += 1
    return steps


def plan_storms(every_s: float, duration_s: float) -> list[float]:
    """Storm times: every_s / 2, then every every_s, strictly before duration_s."""
    if every_s <= 0:
        return []
    times = []
    t = every_s / 2
    while t < duration_s:
        times.append(t)
        t += every_s
    return times


@dataclass
class StormStream:
    """One stream of a disconnect storm, from the client's side."""

    start: float
    end: float = 0.0
    status: int = 0
    outcome: str = "error"  # dropped_after_text | dropped_without_text | http_NNN | error
    error: str | None = None


@dataclass
class Storm:
    at: float
    streams: list[StormStream] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.streams:
            out[s.outcome] = out.get(s.outcome, 0) + 1
        return dict(sorted(out.items()))


@dataclass
class RssSample:
    t: float
    series: str  # "replica:<deployment>/<replica>" or "component:<process name>"
    rss_bytes: float


@dataclass
class SoakResult:
    config: SoakConfig
    records: list[RequestRecord] = field(default_factory=list)
    churn: list[HotLoadEvent] = field(default_factory=list)
    churn_skipped: list[ChurnStep] = field(default_factory=list)
    cleanup: list[HotLoadEvent] = field(default_factory=list)
    storms: list[Storm] = field(default_factory=list)
    samples: list[RssSample] = field(default_factory=list)
    scrape_errors: list[str] = field(default_factory=list)
    model: str | None = None
    started_at: float = 0.0
    wall_s: float = 0.0


def parse_rss(text: str | None) -> dict[str, float]:
    """Series name -> resident bytes, from one scrape: each replica's gauge and each Ray
    component's RSS (ServeReplica, proxy, controller, ... as Ray names its processes)."""
    if not text:
        return {}
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name.removeprefix("ray_") == REPLICA_RSS:
                who = f"{labels.get('deployment', '?')}/{labels.get('replica', '?')}"
                out[f"replica:{who}"] = float(sample.value)
            elif sample.name == COMPONENT_RSS and sample.value > 0 and "Component" in labels:
                key = f"component:{component_name(labels['Component'])}"
                out[key] = out.get(key, 0.0) + float(sample.value) * 2**20
    return out


def component_name(title: str) -> str:
    """Ray names a worker's series after its process title, which carries the method it
    runs ("ray::ServeReplica:mora:LMServer.handle_request"): the name without the method,
    so one process keeps one series. A process's old title is exported as 0 until Ray
    drops it; `parse_rss` skips those. A driver is named by its executable: its file name
    only (a report names no path of the machine that ran it)."""
    if title.startswith("ray::"):
        return title.split(".", 1)[0]
    return title.rsplit("/", 1)[-1]


async def drop_stream(
    client: LoadClient, model: str | None, prompt: str, max_tokens: int, patience_s: float
) -> StormStream:
    """Open one streaming completion and close the connection once text arrives."""
    record = StormStream(start=client.clock())
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "stream": True}
    if model is not None:
        body["model"] = model

    async def read_until_text(response: httpx.Response) -> bool:
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            event = json.loads(line[5:])
            if any(c.get("text") for c in event.get("choices") or []):
                return True
        return False

    try:
        async with client.http.stream("POST", "/v1/completions", json=body) as response:
            record.status = response.status_code
            if response.status_code >= 400:
                await response.aread()
                record.outcome = f"http_{response.status_code}"
            else:
                try:
                    got = await asyncio.wait_for(read_until_text(response), patience_s)
                except TimeoutError:
                    got = False
                record.outcome = "dropped_after_text" if got else "dropped_without_text"
            # Leaving the block unread closes the connection: the drop the server must absorb.
    except (httpx.HTTPError, ValueError) as exc:
        record.outcome = "error"
        record.error = f"{type(exc).__name__}: {exc}"[:300]
    record.end = client.clock()
    return record


async def run_soak(
    cfg: SoakConfig,
    on_tick: Callable[[SoakResult, float], None] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> SoakResult:
    """Run the scenario; `on_tick(result, t)` after every RSS sample (progress display)."""
    churn_plan = plan_churn(cfg.set_paths, cfg.churn_every_s, cfg.duration_s, cfg.max_loaded)
    storm_plan = plan_storms(cfg.storm_every_s, cfg.duration_s)
    result = SoakResult(cfg)
    start = time.perf_counter()
    result.started_at = time.time()
    client = LoadClient(
        cfg.url,
        clock=lambda: time.perf_counter() - start,
        api_key=cfg.api_key,
        admin_token=cfg.admin_token,
        timeout_s=cfg.request_timeout_s,
        max_connections=cfg.max_connections,
        temperature=cfg.temperature,
        transport=transport,
    )
    async with client:
        result.model = cfg.model or await client.first_model()
        tasks = [
            asyncio.ensure_future(_steady(cfg, client, result)),
            asyncio.ensure_future(_churn(churn_plan, client, result)),
            asyncio.ensure_future(_storms(cfg, storm_plan, client, result)),
        ]
        sampler = asyncio.ensure_future(_sample(cfg, client, result, on_tick))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # one that raised leaves the others running otherwise
                task.cancel()
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
            loaded = _still_loaded(result.churn)
            for name in loaded:
                result.cleanup.append(await timed_admin(client, "retire", name))
        # One last sample after the cleanup (and a gauge refresh): what the replicas hold
        # once churn has stopped.
        await asyncio.sleep(cfg.sample_every_s)
        await _sample_once(cfg, client, result)
        if on_tick is not None:
            on_tick(result, client.clock())
        result.wall_s = client.clock()
    result.records.sort(key=lambda r: r.id)
    return result


def _still_loaded(events: list[HotLoadEvent]) -> list[str]:
    loaded: list[str] = []
    for ev in events:
        if not ev.ok:
            continue
        if ev.action == "load":
            loaded.append(ev.name)
        elif ev.name in loaded:
            loaded.remove(ev.name)
    return loaded


async def _steady(cfg: SoakConfig, client: LoadClient, result: SoakResult) -> None:
    factory = RequestFactory(cfg.mix, cfg.prompt_len, cfg.max_tokens, cfg.seed + 1)

    async def user() -> None:
        while client.clock() < cfg.duration_s and factory.next_id < cfg.max_requests:
            spec = factory.make()
            result.records.append(await client.send(spec, result.model, 0.0))

    users = [asyncio.ensure_future(user()) for _ in range(cfg.concurrency)]
    _, pending = await asyncio.wait(users, timeout=cfg.duration_s + cfg.drain_timeout_s)
    for task in pending:  # a request still running after the drain timeout is not recorded
        task.cancel()
    await asyncio.gather(*users, return_exceptions=True)


async def _churn(plan: list[ChurnStep], client: LoadClient, result: SoakResult) -> None:
    names: dict[str, str] = {}  # path -> name the server reported when it loaded it
    for step in plan:
        await asyncio.sleep(max(0.0, step.at - client.clock()))
        if step.action == "load":
            event = await timed_admin(client, "load", step.path)
            if event.ok:
                names[step.path] = event.name
        elif step.path in names:
            event = await timed_admin(client, "retire", names.pop(step.path))
        else:  # its load failed: nothing to retire
            result.churn_skipped.append(step)
            continue
        result.churn.append(event)


async def _storms(
    cfg: SoakConfig, plan: list[float], client: LoadClient, result: SoakResult
) -> None:
    import random

    rng = random.Random(cfg.seed + 2)
    for at in plan:
        await asyncio.sleep(max(0.0, at - client.clock()))
        storm = Storm(at=client.clock())
        prompts = [make_prompt(rng, cfg.prompt_len.sample(rng)) for _ in range(cfg.storm_size)]
        storm.streams = list(
            await asyncio.gather(
                *(
                    drop_stream(client, result.model, p, cfg.storm_max_tokens, cfg.storm_patience_s)
                    for p in prompts
                )
            )
        )
        result.storms.append(storm)


async def _sample_once(cfg: SoakConfig, client: LoadClient, result: SoakResult) -> None:
    text = None
    try:  # an absolute URL: the client's base URL does not apply
        response = await client.http.get(cfg.metrics_url, timeout=10.0)
        response.raise_for_status()
        text = response.text
    except httpx.HTTPError as exc:
        result.scrape_errors.append(f"{client.clock():.1f} s: {exc}"[:300])
    now = client.clock()
    try:
        values = parse_rss(text)
    except ValueError as exc:  # not Prometheus text exposition
        result.scrape_errors.append(f"{now:.1f} s: unparsable scrape: {exc}"[:300])
        return
    for series, value in values.items():
        result.samples.append(RssSample(now, series, value))


async def _sample(
    cfg: SoakConfig,
    client: LoadClient,
    result: SoakResult,
    on_tick: Callable[[SoakResult, float], None] | None,
) -> None:
    k = 0
    while True:
        await asyncio.sleep(max(0.0, k * cfg.sample_every_s - client.clock()))
        await _sample_once(cfg, client, result)
        if on_tick is not None:
            on_tick(result, client.clock())
        k += 1
