"""The soak scenario without Ray: its plan, the slope arithmetic, the RSS scrape parser, and a
whole short run against a fake server behind `httpx.MockTransport`."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import httpx
import pytest

from loadtest import cli
from loadtest.metrics import HotLoadEvent
from loadtest.soak import (
    RssSample,
    SoakConfig,
    SoakPlanError,
    SoakResult,
    parse_rss,
    plan_churn,
    plan_storms,
    run_soak,
)
from loadtest.soak_report import (
    build_summary,
    least_squares_slope,
    rss_slope,
    write_soak_outputs,
)
from loadtest.workload import Dist

# ------------------------------------------------------------------------------ slope


def test_least_squares_slope_is_exact_on_a_line() -> None:
    ts = [0.0, 1.0, 2.5, 4.0, 7.0]
    assert least_squares_slope(ts, [3.0 - 2.0 * t for t in ts]) == pytest.approx(-2.0)
    assert least_squares_slope([1.0], [5.0]) is None
    assert least_squares_slope([2.0, 2.0], [1.0, 9.0]) is None  # no spread in time
    with pytest.raises(ValueError):
        least_squares_slope([1.0, 2.0], [1.0])


def test_slope_ignores_start_up_growth_and_sees_a_plateau() -> None:
    """Steep growth in the first half, then flat with noise: the fit over the second half
    is about 0 MB/min, while a fit over the whole run would call it a leak."""
    rng = random.Random(3)
    ts = [5.0 * i for i in range(121)]  # 10 minutes every 5 s
    rss = [
        (1600 + min(t, 240) * 2.0 + rng.uniform(-3, 3)) * 1e6  # +480 MB in 4 min, then flat
        for t in ts
    ]
    fit = rss_slope(ts, rss, fit_from_s=300.0)
    assert fit["fit_points"] == 61
    assert fit["fit_span_s"] == pytest.approx(300.0)
    assert abs(fit["slope_mb_per_min"]) < 1.0
    whole = rss_slope(ts, rss, fit_from_s=0.0)
    assert whole["slope_mb_per_min"] > 30.0


def test_slope_measures_steady_growth_in_mb_per_minute() -> None:
    rng = random.Random(4)
    ts = [5.0 * i for i in range(121)]
    rss = [(2000 + 2.5 * t / 60 + rng.uniform(-1, 1)) * 1e6 for t in ts]  # 2.5 MB/min
    fit = rss_slope(ts, rss, fit_from_s=300.0)
    assert fit["slope_mb_per_min"] == pytest.approx(2.5, abs=0.2)
    assert rss_slope(ts, rss, fit_from_s=1e9)["slope_mb_per_min"] is None


# ------------------------------------------------------------------------------ plan


def test_churn_plan_alternates_and_bounds_the_pool() -> None:
    paths = ("a", "b", "c", "d")
    plan = plan_churn(paths, every_s=10.0, duration_s=120.0, max_loaded=2)
    assert [s.at for s in plan] == [10.0 * k for k in range(1, 12)]  # strictly before 120
    assert [(s.action, s.path) for s in plan[:7]] == [
        ("load", "a"),
        ("load", "b"),
        ("retire", "a"),
        ("load", "c"),
        ("retire", "b"),
        ("load", "d"),
        ("retire", "c"),
    ]
    loaded: list[str] = []
    for step in plan:
        if step.action == "load":
            assert step.path not in loaded
            loaded.append(step.path)
        else:
            assert step.path == loaded.pop(0)  # the oldest goes first
        assert len(loaded) <= 2
    assert plan[7] == plan_churn(paths, 10.0, 120.0, 2)[7]  # deterministic
    assert ("load", "a") in [(s.action, s.path) for s in plan[7:]]  # names recur


@pytest.mark.parametrize(
    "paths, max_loaded",
    [(("a", "b"), 2), (("a",), 1), (("a", "b", "c"), 0)],
)
def test_churn_plan_refuses_too_few_sets(paths, max_loaded) -> None:
    with pytest.raises(SoakPlanError):
        plan_churn(paths, 10.0, 60.0, max_loaded)


def test_storm_plan_starts_at_half_an_interval() -> None:
    assert plan_storms(60.0, 600.0) == [30.0 + 60.0 * k for k in range(10)]
    assert plan_storms(60.0, 30.0) == []
    assert plan_storms(0.0, 100.0) == []


# ------------------------------------------------------------------------------ scrape

SCRAPE = """\
# HELP ray_mora_replica_rss_bytes Resident memory of a model replica's process.
# TYPE ray_mora_replica_rss_bytes gauge
ray_mora_replica_rss_bytes{application="mora",deployment="LMServer",model="lm",replica="r1"} 2.1e+09
ray_mora_replica_rss_bytes{application="mora",deployment="ClipServer",model="c",replica="r2"} 9e+08
# HELP ray_component_rss_mb RSS usage of all components on the node.
# TYPE ray_component_rss_mb gauge
ray_component_rss_mb{Component="ray::ServeReplica:mora:MoraIngress",ip="127.0.0.1"} 300.0
ray_component_rss_mb{Component="raylet",ip="127.0.0.1"} 50.0
ray_component_rss_mb{Component="ray::ServeReplica:mora:LMServer",ip="127.0.0.1"} 0.0
ray_component_rss_mb{Component="ray::ServeReplica:mora:LMServer.handle_request"} 900.0
ray_component_rss_mb{Component="ray::ServeReplica:mora:LMServer.generate",ip="127.0.0.1"} 1000.0
ray_component_rss_mb{Component="ray::ProxyActor.receive_asgi_messages",ip="127.0.0.1"} 0.0
ray_component_rss_mb{Component="/opt/venv/bin/python3.11",ip="127.0.0.1"} 20.0
# HELP ray_mora_pool_version Pool version being served.
# TYPE ray_mora_pool_version gauge
ray_mora_pool_version{model="lm"} 3.0
"""


def test_parse_rss_keys_replicas_and_components() -> None:
    """A worker's series is named after its process title, method included: the processes
    of one deployment add up under its name without the method, and the zeros Ray exports
    for titles no process has any more are no sample."""
    assert parse_rss(SCRAPE) == {
        "replica:LMServer/r1": 2.1e9,
        "replica:ClipServer/r2": 9e8,
        "component:ray::ServeReplica:mora:MoraIngress": 300.0 * 2**20,
        "component:raylet": 50.0 * 2**20,
        "component:ray::ServeReplica:mora:LMServer": 1900.0 * 2**20,
        "component:python3.11": 20.0 * 2**20,
    }
    assert parse_rss(None) == {}


# ------------------------------------------------------------------------------ a run


class FakeServer:
    """Completions (plain and SSE), the admin API, and a metrics page whose replica RSS
    grows by `grow_bytes` per scrape."""

    def __init__(self, grow_bytes: float = 1e6) -> None:
        self.pool: list[str] = []
        self.version = 0
        self.ops: list[tuple[str, str]] = []
        self.scrapes = 0
        self.grow_bytes = grow_bytes
        self.streams_opened = 0
        self.streams_closed_early = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.url.port == 9999:
            self.scrapes += 1
            rss = 1.5e9 + self.grow_bytes * self.scrapes
            text = f'ray_mora_replica_rss_bytes{{deployment="LMServer",replica="r1"}} {rss}\n'
            return httpx.Response(200, text=text)
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake-lm"}]})
        if path == "/v1/experts" and request.method == "POST":
            name = json.loads(request.content)["path"]
            if name in self.pool:
                return httpx.Response(409, json={"error": {"message": "already loaded"}})
            self.pool.append(name)
            self.version += 1
            self.ops.append(("load", name))
            return httpx.Response(200, json={"name": name, "version": self.version})
        if path.startswith("/v1/experts/") and request.method == "DELETE":
            name = path.rsplit("/", 1)[1]
            if name not in self.pool:
                return httpx.Response(404, json={"error": {"message": "not loaded"}})
            self.pool.remove(name)
            self.version += 1
            self.ops.append(("retire", name))
            return httpx.Response(200, json={"name": name, "version": self.version})
        if path == "/v1/completions":
            body = json.loads(request.content)
            n = int(body["max_tokens"])
            usage = {"prompt_tokens": 3, "completion_tokens": n}
            if not body.get("stream"):
                choice = {"index": 0, "text": " w" * n, "finish_reason": "length"}
                return httpx.Response(200, json={"choices": [choice], "usage": usage})
            return httpx.Response(200, stream=self.sse(n, usage))
        return httpx.Response(404, json={"error": {"message": "no route"}})

    def sse(self, n: int, usage: dict) -> httpx.AsyncByteStream:
        server = self

        class Stream(httpx.AsyncByteStream):
            def __init__(self) -> None:
                self.finished = False
                server.streams_opened += 1

            async def __aiter__(self):
                for _ in range(n):
                    await asyncio.sleep(0)
                    chunk = {"choices": [{"index": 0, "text": " w"}]}
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
                yield b"data: [DONE]\n\n"
                self.finished = True

            async def aclose(self) -> None:
                if not self.finished:
                    server.streams_closed_early += 1

        return Stream()


def soak_config(**over) -> SoakConfig:
    base = dict(
        url="http://127.0.0.1:8000",
        metrics_url="http://127.0.0.1:9999/metrics",
        duration_s=1.2,
        set_paths=("s0", "s1", "s2"),
        mix={"completions": 0.5, "stream": 0.5},
        prompt_len=Dist.parse("4"),
        max_tokens=Dist.parse("uniform:4,8"),
        admin_token="admin",
        concurrency=2,
        churn_every_s=0.15,
        max_loaded=2,
        storm_every_s=0.5,
        storm_size=5,
        storm_max_tokens=20,
        sample_every_s=0.1,
        progress=False,
    )
    base.update(over)
    return SoakConfig(**base)


def test_soak_run_follows_its_plan_and_reports(tmp_path: Path) -> None:
    fake = FakeServer(grow_bytes=1e6)
    cfg = soak_config()
    ticks: list[float] = []
    result = asyncio.run(
        run_soak(
            cfg, on_tick=lambda r, t: ticks.append(t), transport=httpx.MockTransport(fake.handler)
        )
    )
    plan = plan_churn(cfg.set_paths, cfg.churn_every_s, cfg.duration_s, cfg.max_loaded)
    assert fake.ops[: len(plan)] == [(s.action, s.path) for s in plan]
    assert [(e.action, e.name) for e in result.churn] == [(s.action, s.path) for s in plan]
    assert fake.pool == []  # the cleanup retired what the churn left loaded
    left: list[str] = []  # the plan replayed: what is loaded at its end, oldest first
    for step in plan:
        (left.append if step.action == "load" else left.remove)(step.path)
    assert left and [e.name for e in result.cleanup] == left

    assert [s.at for s in result.storms] == pytest.approx(plan_storms(0.5, 1.2), abs=0.3)
    outcomes = [st.outcome for storm in result.storms for st in storm.streams]
    assert outcomes == ["dropped_after_text"] * (2 * cfg.storm_size)
    assert fake.streams_closed_early >= 2 * cfg.storm_size  # storms dropped mid-stream

    assert result.records and all(r.ok for r in result.records)
    assert {r.kind for r in result.records} == {"completions", "stream"}
    assert len(ticks) == fake.scrapes >= 5
    values = [s.rss_bytes for s in result.samples]
    assert values == sorted(values) and len(set(values)) == len(values)

    summary = write_soak_outputs(result, tmp_path, max_slope_mb_per_min=None)
    assert summary["passed"], summary["checks"]
    stats = summary["rss"]["stats"]["replica:LMServer/r1"]
    assert stats["slope_mb_per_min"] > 0
    assert stats["last_mb"] - stats["first_mb"] == pytest.approx(fake.scrapes - 1, abs=1e-6)
    assert summary["requests"]["failed"] == 0
    assert summary["storms"]["outcomes"] == {"dropped_after_text": 2 * cfg.storm_size}
    assert summary["churn"]["failed"] == 0 and summary["churn"]["skipped"] == 0
    on_disk = json.loads((tmp_path / "soak_summary.json").read_text())
    assert on_disk["schema"] == "mora-loadtest-soak/1"
    assert (tmp_path / "soak_rss.png").stat().st_size > 1000

    # The same run judged against a slope ceiling below its growth fails.
    failing = build_summary(result, max_slope_mb_per_min=stats["slope_mb_per_min"] / 2)
    assert not failing["passed"]
    assert failing["checks"]["replicas_over_slope"] == ["replica:LMServer/r1"]


def test_failed_loads_are_not_retired_and_fail_the_run() -> None:
    fake = FakeServer()
    fake.pool.append("s1")  # s1's load answers 409
    result = asyncio.run(
        run_soak(
            soak_config(duration_s=1.0, storm_every_s=10.0),
            transport=httpx.MockTransport(fake.handler),
        )
    )
    failed = [e for e in result.churn if not e.ok]
    assert [(e.action, e.name, e.status) for e in failed] == [("load", "s1", 409)]
    assert [s.path for s in result.churn_skipped] == ["s1"]  # its retire was skipped
    assert fake.pool == ["s1"]  # not ours: left alone
    summary = build_summary(result)
    assert not summary["passed"]
    assert summary["checks"]["churn_operations_failed"] == 1


def test_no_rss_samples_fail_the_run() -> None:
    cfg = soak_config()
    result = SoakResult(cfg)
    assert not build_summary(result)["passed"]
    result.samples = [RssSample(t, "component:raylet", 1e8) for t in (0.1, 0.9)]
    result.churn = [HotLoadEvent(0.1, 0.2, "load", "s0", True, 1, 200)]
    assert build_summary(result)["checks"]["replicas_sampled"] == 0
    assert not build_summary(result)["passed"]


# ------------------------------------------------------------------------------ cli


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "--admin-token"),
        (["--admin-token", "x", "--rate", "2"], "--concurrency"),
        (["--admin-token", "x", "--soak-sets", "2"], "--soak-max-loaded"),
        (["--admin-token", "x", "--metrics-url", "none"], "--metrics-url"),
        (["--admin-token", "x"], "--hotload-sets or --hotload-store"),
        (["--admin-token", "x", "--url", "http://10.0.0.1:8000"], "loopback"),
    ],
)
def test_soak_cli_refuses_bad_settings(extra, message, capsys, monkeypatch) -> None:
    monkeypatch.delenv("MORA_ADMIN_TOKEN", raising=False)
    code = cli.main(["run", "--scenario", "soak", "--duration-s", "30", *extra])
    assert code == 2
    assert message in capsys.readouterr().err
