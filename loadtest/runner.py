"""Drive one load test: open loop (planned arrivals) or closed loop (N concurrent users),
optionally with the hot-load scenario, bounded in time and count, plus metric scrapes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadtest.client import LoadClient
from loadtest.hotload import run_hotloads, timed_admin
from loadtest.metrics import HotLoadEvent, RequestRecord
from loadtest.workload import Dist, RequestFactory, RequestSpec, arrival_times

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    url: str
    duration_s: float
    mix: dict[str, float]
    prompt_len: Dist
    max_tokens: Dist
    concurrency: int | None = None  # closed loop
    rate: float | None = None  # open loop
    arrival: str = "poisson"
    warmup_s: float = 0.0
    seed: int = 0
    model: str | None = None
    max_requests: int = 10_000
    max_inflight: int = 256
    request_timeout_s: float = 120.0
    drain_timeout_s: float = 120.0
    temperature: float = 1.0
    api_key: str | None = None
    metrics_url: str | None = None
    settle_s: float = 5.0  # wait before the last scrape: replicas report every few seconds
    admin_token: str | None = None
    hotload_paths: tuple[str, ...] = ()
    hotload_every_s: float = 0.0
    hotload_retire: bool = True

    def describe(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("api_key", "admin_token")}
        out["prompt_len"] = str(self.prompt_len)
        out["max_tokens"] = str(self.max_tokens)
        out["hotload_paths"] = list(self.hotload_paths)
        out["mode"] = "closed" if self.concurrency else "open"
        return out


@dataclass
class RunResult:
    config: RunConfig
    records: list[RequestRecord]
    events: list[HotLoadEvent] = field(default_factory=list)
    cleanup: list[HotLoadEvent] = field(default_factory=list)
    not_sent: int = 0  # open loop: planned requests skipped because max_inflight was reached
    model: str | None = None
    initial_pool: dict[str, Any] | None = None
    scrape_before: str | None = None
    scrape_after: str | None = None
    scrape_errors: list[str] = field(default_factory=list)
    started_at: float = 0.0  # wall clock (epoch seconds) of t = 0
    wall_s: float = 0.0


async def scrape(url: str | None, errors: list[str]) -> str | None:
    if not url:
        return None
    try:
        async with httpx.AsyncClient(timeout=10.0) as http:
            response = await http.get(url)
            response.raise_for_status()
            return response.text
    except httpx.HTTPError as exc:
        errors.append(f"{url}: {exc}")
        return None


async def run(cfg: RunConfig) -> RunResult:
    result = RunResult(cfg, [])
    result.scrape_before = await scrape(cfg.metrics_url, result.scrape_errors)
    start = time.perf_counter()
    result.started_at = time.time()
    client = LoadClient(
        cfg.url,
        clock=lambda: time.perf_counter() - start,
        api_key=cfg.api_key,
        admin_token=cfg.admin_token,
        timeout_s=cfg.request_timeout_s,
        max_connections=cfg.max_inflight,
        temperature=cfg.temperature,
    )
    async with client:
        needs_model = any(k in cfg.mix for k in ("completions", "stream"))
        result.model = cfg.model or (await client.first_model() if needs_model else None)
        if cfg.hotload_paths:
            result.initial_pool = await client.list_sets()
        hot = None
        if cfg.hotload_paths:
            hot = asyncio.ensure_future(
                run_hotloads(
                    client,
                    list(cfg.hotload_paths),
                    cfg.hotload_every_s,
                    cfg.duration_s,
                    result.events,
                )
            )
        if cfg.concurrency:
            await _closed_loop(cfg, client, result)
        else:
            await _open_loop(cfg, client, result)
        if hot is not None:
            await hot
            if cfg.hotload_retire:
                for ev in [e for e in result.events if e.ok and e.action == "load"]:
                    result.cleanup.append(await timed_admin(client, "retire", ev.name))
        result.wall_s = client.clock()
    result.records.sort(key=lambda r: r.id)
    if cfg.metrics_url:
        await asyncio.sleep(cfg.settle_s)
        result.scrape_after = await scrape(cfg.metrics_url, result.scrape_errors)
    return result


async def _drain(tasks: set[asyncio.Task], cfg: RunConfig, result: RunResult) -> None:
    """Wait for requests in flight; cut those still running after the drain timeout."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=cfg.drain_timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in tasks:
        if task.cancelled():
            continue
        result.records.append(task.result())


def _cut_record(spec: RequestSpec, started: float, now: float, warmup_s: float) -> RequestRecord:
    return RequestRecord(
        id=spec.id,
        kind=spec.kind,
        start=started,
        end=now,
        scheduled=spec.at,
        error="drain_timeout",
        error_message="still running when the drain timeout ended the run",
        warmup=started < warmup_s,
    )


async def _open_loop(cfg: RunConfig, client: LoadClient, result: RunResult) -> None:
    rng = random.Random(cfg.seed)
    times = arrival_times(cfg.rate or 0.0, cfg.duration_s, cfg.arrival, rng, cfg.max_requests)
    factory = RequestFactory(cfg.mix, cfg.prompt_len, cfg.max_tokens, cfg.seed + 1)
    tasks: set[asyncio.Task] = set()
    started: dict[asyncio.Task, tuple[RequestSpec, float]] = {}
    for at in times:
        spec = factory.make(at)
        delay = at - client.clock()
        if delay > 0:
            await asyncio.sleep(delay)
        if sum(1 for t in tasks if not t.done()) >= cfg.max_inflight:
            result.not_sent += 1
            continue
        task = asyncio.ensure_future(client.send(spec, result.model, cfg.warmup_s))
        tasks.add(task)
        started[task] = (spec, client.clock())
    await _drain(tasks, cfg, result)
    _record_cut(tasks, started, client, cfg, result)


async def _closed_loop(cfg: RunConfig, client: LoadClient, result: RunResult) -> None:
    factory = RequestFactory(cfg.mix, cfg.prompt_len, cfg.max_tokens, cfg.seed + 1)
    started: dict[asyncio.Task, tuple[RequestSpec, float]] = {}

    async def user() -> None:
        while client.clock() < cfg.duration_s and factory.next_id < cfg.max_requests:
            spec = factory.make()
            task = asyncio.ensure_future(client.send(spec, result.model, cfg.warmup_s))
            started[task] = (spec, client.clock())
            await asyncio.shield(task)  # cancelling a user must not cancel its request

    users = {asyncio.ensure_future(user()) for _ in range(cfg.concurrency or 1)}
    await asyncio.wait(users, timeout=cfg.duration_s + cfg.drain_timeout_s)
    for task in users:
        task.cancel()
    await asyncio.gather(*users, return_exceptions=True)
    await _drain(set(started), cfg, result)
    _record_cut(set(started), started, client, cfg, result)


def _record_cut(
    tasks: set[asyncio.Task],
    started: dict[asyncio.Task, tuple[RequestSpec, float]],
    client: LoadClient,
    cfg: RunConfig,
    result: RunResult,
) -> None:
    now = client.clock()
    for task in tasks:
        if task.cancelled():
            spec, at = started[task]
            result.records.append(_cut_record(spec, at, now, cfg.warmup_s))
