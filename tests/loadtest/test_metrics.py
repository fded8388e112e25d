"""Load-test arithmetic on hand-made timelines, workload parsing, and `compare`."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from loadtest import cli
from loadtest.compare import compare
from loadtest.metrics import (
    HotLoadEvent,
    RequestRecord,
    distribution,
    e2e,
    hotload_block,
    itl_gaps,
    percentile,
    sets_by_version,
    summarize,
    timeseries,
    tpot,
    ttft,
    version_violations,
)
from loadtest.workload import Dist, RequestFactory, WorkloadError, arrival_times, parse_mix


def stream(id: int, start: float, chunks: list[float], end: float, **kw) -> RequestRecord:
    return RequestRecord(
        id=id,
        kind="stream",
        start=start,
        end=end,
        status=200,
        first_text=chunks[0] if chunks else None,
        chunk_times=list(chunks),
        output_tokens=kw.pop("tokens", len(chunks)),
        **kw,
    )


def plain(id: int, start: float, end: float, **kw) -> RequestRecord:
    return RequestRecord(id=id, kind="completions", start=start, end=end, status=200, **kw)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 101])
def test_percentile_matches_numpy_linear(n) -> None:
    rng = random.Random(n)
    values = [rng.expovariate(1.0) for _ in range(n)]
    for p in (0, 50, 90, 95, 99, 100):
        assert percentile(values, p) == pytest.approx(np.percentile(values, p))
    assert percentile([], 50) is None


def test_distribution_ignores_missing_values() -> None:
    d = distribution([1.0, None, 3.0, math.nan])
    assert d["count"] == 2 and d["mean"] == 2.0 and d["p50"] == 2.0
    assert distribution([])["p99"] is None


def test_timeline_formulas() -> None:
    r = stream(0, 0.5, [1.0, 1.5, 2.5], 2.6)
    assert ttft(r) == pytest.approx(0.5)
    assert itl_gaps(r) == pytest.approx([0.5, 1.0])
    assert tpot(r) == pytest.approx((2.6 - 1.0) / 2)
    assert e2e(r) == pytest.approx(2.1)
    one = stream(1, 0.0, [0.2], 0.3)
    assert tpot(one) is None and itl_gaps(one) == []
    assert ttft(plain(2, 0.0, 1.0)) is None


def test_summary_excludes_warmup_and_counts_throughput() -> None:
    records = [
        plain(0, 0.5, 1.5, output_tokens=10, warmup=True),  # excluded everywhere
        plain(1, 2.0, 3.0, output_tokens=20),
        stream(2, 2.5, [2.7, 2.8, 2.9], 4.0, tokens=3),
        RequestRecord(3, "completions", 3.0, 3.2, status=503, error="http_503"),
        RequestRecord(4, "stream", 3.5, 3.9, status=200, error="mid_stream"),
    ]
    s = summarize(records, duration_s=4.0, warmup_s=2.0, target_rate=2.0)
    assert s["requests"]["measured"] == 4 and s["requests"]["warmup_excluded"] == 1
    assert s["requests"]["succeeded"] == 2 and s["requests"]["failed"] == 2
    window = 4.0 - 2.0  # warm-up end to the last measured end
    assert s["window"]["measured_s"] == pytest.approx(window)
    assert s["throughput"]["requests_per_s"] == pytest.approx(2 / window)
    assert s["throughput"]["output_tokens_per_s"] == pytest.approx(23 / window)
    assert s["throughput"]["achieved_rate_per_s"] == pytest.approx(4 / 2.0)
    assert s["errors"]["by_type"] == {"http_503": 1, "mid_stream": 1}
    assert s["errors"]["by_status"] == {"503": 1, "200": 1}
    assert s["errors"]["rate"] == pytest.approx(0.5)
    assert s["latency"]["stream"]["ttft_s"]["count"] == 1
    assert s["latency"]["stream"]["itl_s"]["count"] == 2
    assert s["latency"]["all"]["e2e_s"]["max"] == pytest.approx(1.5)


def test_mora_blocks_are_aggregated() -> None:
    records = [
        plain(0, 0, 1, active_ranks=2.0, pool_version=3, expert_sets={"a": 1.0}),
        plain(1, 0, 1, active_ranks=4.0, pool_version=4, expert_sets={"a": 0.5, "b": 0.5}),
        plain(2, 0, 1),  # an OpenAI server without the extension
    ]
    mora = summarize(records, duration_s=1, warmup_s=0)["mora"]
    assert mora["responses_with_mora"] == 2
    assert mora["active_ranks_per_token"]["mean"] == pytest.approx(3.0)
    assert mora["expert_set_share_mean"] == pytest.approx({"a": 0.75, "b": 0.25})
    assert mora["pool_versions_seen"] == [3, 4]


def test_timeseries_conserves_tokens_and_requests() -> None:
    records = [
        stream(0, 0.1, [0.5, 1.2, 2.7], 2.8, tokens=6),
        plain(1, 0.2, 1.9, output_tokens=5),
        RequestRecord(2, "completions", 0.3, 0.4, status=500, error="http_500"),
    ]
    ts = timeseries(records, bin_s=1.0)
    assert ts["t_s"] == [0.0, 1.0, 2.0]
    assert sum(ts["output_tokens_per_s"]) == pytest.approx(11)
    assert ts["output_tokens_per_s"][0] == pytest.approx(2)  # one chunk of the stream
    assert sum(ts["requests_per_s"]) == 2 and sum(ts["failures_per_s"]) == 1
    assert ts["in_flight"] == [3, 2, 1]


EVENTS = [
    HotLoadEvent(10.0, 10.5, "load", "s1", True, version=2, status=200),
    HotLoadEvent(20.0, 20.4, "load", "s2", True, version=3, status=200),
]


def test_sets_by_version() -> None:
    versions = sets_by_version(1, ["base"], EVENTS)
    assert versions == {1: {"base"}, 2: {"base", "s1"}, 3: {"base", "s1", "s2"}}
    retire = [*EVENTS, HotLoadEvent(30, 30.1, "retire", "s1", True, version=4)]
    assert sets_by_version(1, ["base"], retire)[4] == {"base", "s2"}


def test_consistent_responses_pass() -> None:
    versions = sets_by_version(1, [], EVENTS)
    records = [
        plain(0, 9.0, 11.0, pool_version=1),  # admitted before the commit answered
        plain(1, 10.2, 12.0, pool_version=2, expert_sets={"s1": 1.0}),
        plain(2, 21.0, 22.0, pool_version=3, expert_sets={"s1": 0.3, "s2": 0.7}),
    ]
    assert version_violations(records, EVENTS, versions) == []


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        (plain(0, 12.0, 13.0, pool_version=2, expert_sets={"s2": 1.0}), "sets not in version"),
        (plain(1, 11.0, 12.0, pool_version=1), "older than committed"),
        (plain(2, 5.0, 6.0, pool_version=2), "future"),
        (plain(3, 25.0, 26.0, pool_version=7), "no operation"),
    ],
)
def test_mixed_or_impossible_versions_are_flagged(record, problem) -> None:
    versions = sets_by_version(1, [], EVENTS)
    bad = version_violations([record], EVENTS, versions)
    assert len(bad) == 1 and problem in bad[0]["problem"]


def test_other_models_may_lag_the_cluster_version() -> None:
    """A CLIP replica sees an LM load's version bump only when it next reconciles."""
    versions = sets_by_version(1, [], EVENTS)
    late = RequestRecord(0, "classify", 11.0, 11.1, status=200, pool_version=1)
    assert version_violations([late], EVENTS, versions) == []
    mixed = RequestRecord(1, "classify", 11.0, 11.1, status=200, pool_version=1)
    mixed.expert_sets = {"s1": 1.0}
    assert version_violations([mixed], EVENTS, versions)[0]["kind"] == "classify"


def test_hotload_block_splits_latency_around_swaps() -> None:
    records = [
        plain(0, 9.8, 10.2, pool_version=1),  # overlaps the first swap
        plain(1, 12.0, 12.1, pool_version=2),
        plain(2, 20.3, 21.0, pool_version=3),  # overlaps the second
        RequestRecord(3, "completions", 15, 15.5, status=503, error="http_503"),
    ]
    block = hotload_block(records, EVENTS, initial_version=1, initial_sets=[])
    assert block["during_swaps"]["requests"] == 2
    assert block["outside_swaps"]["requests"] == 1
    assert block["failed_requests"] == 1 and block["failed_requests_during_swaps"] == 0
    assert block["loads_ok"] == 2 and block["mixed_version_responses"] == 0
    assert block["passed"] is False  # a failed request fails the scenario
    ok = hotload_block(records[:3], EVENTS, initial_version=1, initial_sets=[])
    assert ok["passed"] is True


@pytest.mark.parametrize(
    ("text", "low", "high"),
    [
        ("32", 32, 32),
        ("const:7", 7, 7),
        ("uniform:4,9", 4, 9),
        ("normal:20,3", 1, 60),
        ("lognormal:20,0.5", 1, 1000),
        ("choice:8,16,32", 8, 32),
    ],
)
def test_distributions_sample_positive_ints(text, low, high) -> None:
    dist = Dist.parse(text)
    rng = random.Random(0)
    values = [dist.sample(rng) for _ in range(200)]
    assert all(isinstance(v, int) and low <= v <= high for v in values)
    assert Dist.parse(str(dist)) == dist


@pytest.mark.parametrize("text", ["uniform:5", "gamma:1,2", "uniform:9,4", "const:x", "const:-1"])
def test_bad_distributions(text) -> None:
    with pytest.raises(WorkloadError):
        Dist.parse(text)


def test_mix() -> None:
    assert parse_mix("completions=3,stream=1,classify=0") == {"completions": 0.75, "stream": 0.25}
    for bad in ("chat=1", "stream", "stream=-1", "stream=0"):
        with pytest.raises(WorkloadError):
            parse_mix(bad)


def test_arrivals() -> None:
    assert arrival_times(4, 1.0, "constant", random.Random(0), 100) == [0, 0.25, 0.5, 0.75]
    a = arrival_times(50, 20.0, "poisson", random.Random(1), 10_000)
    assert a == arrival_times(50, 20.0, "poisson", random.Random(1), 10_000)
    assert abs(len(a) / 20.0 - 50) < 5  # mean rate, within ~3 sigma
    assert len(arrival_times(50, 20.0, "poisson", random.Random(1), 7)) == 7  # count bound


def test_factory_is_deterministic_and_follows_the_mix() -> None:
    def draw():
        f = RequestFactory({"stream": 0.5, "classify": 0.5}, Dist.parse("8"), Dist.parse("4"), 3)
        return [f.make() for _ in range(100)]

    first = draw()
    assert first == draw()
    assert {s.kind for s in first} == {"stream", "classify"}
    assert all(s.max_tokens == 4 and len(s.prompt.split()) >= 4 for s in first)


def fake_summary(e2e_p99: float, rate: float, errors: float = 0.0) -> dict:
    lat = {m: {"p50": 0.1, "p95": 0.2, "p99": 0.3} for m in ("ttft_s", "itl_s", "tpot_s", "e2e_s")}
    lat["e2e_s"] = {"p50": 1.0, "p95": 1.5, "p99": e2e_p99}
    return {
        "schema": "mora-loadtest/1",
        "latency": {"all": lat},
        "throughput": {"requests_per_s": rate, "output_tokens_per_s": 10 * rate},
        "errors": {"rate": errors},
        "hotload": None,
    }


def test_compare_flags_only_regressions_beyond_tolerance() -> None:
    base = fake_summary(2.0, 5.0)
    assert not any(c.regression for c in compare(base, fake_summary(2.1, 4.8)))
    worse = {c.metric for c in compare(base, fake_summary(2.5, 5.0)) if c.regression}
    assert worse == {"all.e2e_s.p99"}
    slower = {c.metric for c in compare(base, fake_summary(2.0, 4.0)) if c.regression}
    assert slower == {"throughput.requests_per_s", "throughput.output_tokens_per_s"}
    errors = {c.metric for c in compare(base, fake_summary(2.0, 5.0, 0.05)) if c.regression}
    assert errors == {"errors.rate"}
    # A big relative change below the absolute floor is noise.
    tiny = fake_summary(2.0, 5.0)
    tiny["latency"]["all"]["itl_s"]["p50"] = 0.1011
    assert not any(c.regression for c in compare(base, tiny, abs_floor_s=0.002))


def test_compare_cli_exit_codes(tmp_path, capsys) -> None:
    a, b, junk = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "junk.json"
    a.write_text(json.dumps(fake_summary(2.0, 5.0)))
    b.write_text(json.dumps(fake_summary(3.0, 5.0)))
    junk.write_text("{}")
    assert cli.main(["compare", str(a), str(a)]) == 0
    assert cli.main(["compare", str(a), str(b)]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert cli.main(["compare", str(a), str(b), "--tolerance", "0.6"]) == 0
    assert cli.main(["compare", str(a), str(junk)]) == 2


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://127.0.0.1:8000", True),
        ("http://127.5.0.9", True),
        ("http://localhost:1", True),
        ("http://[::1]:8000", True),
        ("http://example.invalid:8000", False),
        ("http://192.0.2.1", False),
    ],
)
def test_loopback_detection(url, loopback) -> None:
    assert cli.is_loopback(url) is loopback


def test_run_refuses_remote_urls_before_sending(capsys) -> None:
    assert cli.main(["run", "--url", "http://example.invalid:8000", "--duration", "1"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    # The metrics endpoint is held to the same rule.
    args = ["run", "--metrics-url", "http://example.invalid/metrics", "--duration", "1"]
    assert cli.main(args) == 2
