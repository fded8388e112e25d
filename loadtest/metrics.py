"""Load-test arithmetic on request timelines: pure functions, no I/O, no clock.

Every time is in seconds on one monotonic clock with 0 at the start of the run. One
request's timeline, and what is derived from it (the same text goes into every summary):

    start ──── first text chunk ──── chunk ─ chunk ─ … ──── end
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

FORMULAS = {
    "ttft": "TTFT = t(first chunk carrying text) - t(request sent); streamed requests only",
    "itl": "ITL = t(chunk i+1) - t(chunk i) over consecutive chunks carrying text; every gap "
    "of every streamed request is one sample",
    "tpot": "TPOT = (t(end) - t(first text chunk)) / (output_tokens - 1); streamed requests "
    "with >= 2 output tokens",
    "e2e": "E2E = t(response complete) - t(request sent)",
    "percentile": "p-th percentile with linear interpolation between closest ranks "
    "(numpy's default 'linear' method)",
    "window": "measured window = [warmup_s, last end of a measured request]; a request is "
    "measured if it was sent at or after warmup_s (warm-up requests are excluded everywhere)",
    "request_throughput": "successful measured requests / measured window",
    "token_throughput": "output tokens of successful measured requests / measured window",
    "achieved_rate": "measured requests sent / (duration_s - warmup_s); target_rate is the "
    "configured arrival rate (open loop only)",
    "error_rate": "failed measured requests / measured requests",
    "active_ranks_per_token": "the server's `mora.active_ranks_per_token` per response (mean "
    "over that response's tokens and adapted layers), one sample per response",
    "mixed_versions": "a response is inconsistent if it names an expert set absent from the "
    "pool version it reports, reports a version created after it ended or by no operation, "
    "or (LM requests) reports a version older than one whose load was answered before it "
    "was sent",
    "during_swap": "a request is 'during a swap' if [start, end] overlaps [load sent, load "
    "answered] of any hot-load operation",
}

PERCENTILES = (50, 90, 95, 99)
LM_KINDS = ("completions", "stream")


@dataclass
class RequestRecord:
    """What the client saw of one request (times relative to the run's start)."""

    id: int
    kind: str  # completions | stream | classify
    start: float
    end: float = math.nan
    scheduled: float | None = None  # planned send time (open loop)
    status: int = 0  # HTTP status; 0 when no response arrived
    error: str | None = None  # None = success; else a short type, e.g. "http_503"
    error_message: str | None = None
    first_text: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # chunks carrying text
    prompt_tokens: int = 0
    output_tokens: int = 0
    pool_version: int | None = None
    active_ranks: float | None = None
    expert_sets: dict[str, float] = field(default_factory=dict)
    warmup: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["chunk_times"] = [round(t, 6) for t in self.chunk_times]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class HotLoadEvent:
    """One admin operation during the run (times relative to the run's start)."""

    start: float
    end: float
    action: str  # load | retire
    name: str
    ok: bool
    version: int | None = None  # the pool version it committed
    status: int = 0
    error: str | None = None


# --------------------------------------------------------------------------- basics
def percentile(values: Sequence[float], p: float) -> float | None:
    """Linear interpolation between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Iterable[float]) -> dict[str, Any]:
    """count, mean, min, max and the percentiles of `values` (None when empty)."""
    data = [v for v in values if v is not None and math.isfinite(v)]
    out: dict[str, Any] = {"count": len(data)}
    out["mean"] = sum(data) / len(data) if data else None
    out["min"] = min(data) if data else None
    out["max"] = max(data) if data else None
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(data, p)
    return out


def ttft(r: RequestRecord) -> float | None:
    return None if r.first_text is None else r.first_text - r.start


def e2e(r: RequestRecord) -> float:
    return r.end - r.start


def itl_gaps(r: RequestRecord) -> list[float]:
    times = r.chunk_times
    return [b - a for a, b in itertools.pairwise(times)]


def tpot(r: RequestRecord) -> float | None:
    if r.first_text is None or r.output_tokens < 2:
        return None
    return (r.end - r.first_text) / (r.output_tokens - 1)


# --------------------------------------------------------------------------- summary
def latency_block(records: Sequence[RequestRecord]) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    return {
        "requests": len(ok),
        "ttft_s": distribution(ttft(r) for r in ok),
        "itl_s": distribution(g for r in ok for g in itl_gaps(r)),
        "tpot_s": distribution(tpot(r) for r in ok),
        "e2e_s": distribution(e2e(r) for r in ok),
    }


def summarize(
    records: Sequence[RequestRecord],
    *,
    duration_s: float,
    warmup_s: float,
    target_rate: float | None = None,
) -> dict[str, Any]:
    """Everything the report states about the measured (non-warm-up) requests."""
    measured = [r for r in records if not r.warmup]
    ok = [r for r in measured if r.ok]
    last_end = max((r.end for r in measured if math.isfinite(r.end)), default=warmup_s)
    window = max(last_end - warmup_s, 1e-9)
    issue_window = max(duration_s - warmup_s, 1e-9)
    tokens = sum(r.output_tokens for r in ok)
    kinds = sorted({r.kind for r in measured})
    failed = [r for r in measured if not r.ok]
    ranks = [r.active_ranks for r in ok if r.active_ranks is not None]
    return {
        "window": {
            "warmup_s": warmup_s,
            "duration_s": duration_s,
            "measured_from_s": warmup_s,
            "measured_to_s": last_end,
            "measured_s": window,
        },
        "requests": {
            "sent": len(records),
            "warmup_excluded": len(records) - len(measured),
            "measured": len(measured),
            "succeeded": len(ok),
            "failed": len(failed),
            "by_kind": {k: sum(1 for r in measured if r.kind == k) for k in kinds},
        },
        "throughput": {
            "requests_per_s": len(ok) / window,
            "output_tokens_per_s": tokens / window,
            "output_tokens": tokens,
            "prompt_tokens": sum(r.prompt_tokens for r in ok),
            "achieved_rate_per_s": len(measured) / issue_window,
            "target_rate_per_s": target_rate,
        },
        "errors": errors_block(measured),
        "latency": {
            "all": latency_block(measured),
            **{k: latency_block([r for r in measured if r.kind == k]) for k in kinds},
        },
        "mora": {
            "responses_with_mora": len(ranks),
            "active_ranks_per_token": distribution(ranks),
            "expert_set_share_mean": expert_share_means(ok),
            "pool_versions_seen": sorted(
                {r.pool_version for r in ok if r.pool_version is not None}
            ),
        },
    }


def errors_block(records: Sequence[RequestRecord]) -> dict[str, Any]:
    failed = [r for r in records if not r.ok]
    return {
        "count": len(failed),
        "rate": len(failed) / len(records) if records else 0.0,
        "by_type": dict(Counter(r.error or "" for r in failed).most_common()),
        "by_status": {str(k): v for k, v in Counter(r.status for r in failed).most_common()},
        "examples": [
            {"id": r.id, "kind": r.kind, "error": r.error, "message": r.error_message}
            for r in failed[:5]
        ],
    }


def expert_share_means(records: Sequence[RequestRecord]) -> dict[str, float]:
    """Mean share of each expert set over the responses carrying a `mora` block."""
    with_mora = [r for r in records if r.active_ranks is not None]
    if not with_mora:
        return {}
    totals: Counter[str] = Counter()
    for r in with_mora:
        totals.update(r.expert_sets)
    return {name: totals[name] / len(with_mora) for name in sorted(totals)}


def timeseries(
    records: Sequence[RequestRecord], *, bin_s: float = 1.0, until: float | None = None
) -> dict[str, list[float]]:
    """Per-bin completions (by end time) and output tokens (streamed: spread over the
    chunks' arrival times; otherwise at the end), failures, and requests in flight."""
    finite = [r for r in records if math.isfinite(r.end)]
    horizon = until if until is not None else max((r.end for r in finite), default=0.0)
    bins = max(1, math.ceil(horizon / bin_s))
    done = [0.0] * bins
    failed = [0.0] * bins
    tokens = [0.0] * bins
    inflight = [0.0] * bins

    def slot(t: float) -> int:
        return min(max(int(t / bin_s), 0), bins - 1)

    for r in finite:
        (done if r.ok else failed)[slot(r.end)] += 1
        if r.chunk_times:
            share = r.output_tokens / len(r.chunk_times)
            for t in r.chunk_times:
                tokens[slot(t)] += share
        else:
            tokens[slot(r.end)] += r.output_tokens
        for i in range(slot(r.start), slot(r.end) + 1):
            inflight[i] += 1
    return {
        "t_s": [i * bin_s for i in range(bins)],
        "requests_per_s": [v / bin_s for v in done],
        "failures_per_s": [v / bin_s for v in failed],
        "output_tokens_per_s": [v / bin_s for v in tokens],
        "in_flight": inflight,
    }


# --------------------------------------------------------------------------- hot-load
def overlaps(r: RequestRecord, events: Sequence[HotLoadEvent]) -> bool:
    return any(r.start <= ev.end and ev.start <= r.end for ev in events)


def sets_by_version(
    initial_version: int, initial_sets: Iterable[str], events: Sequence[HotLoadEvent]
) -> dict[int, frozenset[str]]:
    """The expert sets present at every pool version the run created."""
    current = set(initial_sets)
    out = {initial_version: frozenset(current)}
    for ev in sorted((e for e in events if e.ok and e.version is not None), key=_version):
        if ev.action == "load":
            current.add(ev.name)
        else:
            current.discard(ev.name)
        out[_version(ev)] = frozenset(current)
    return out


def _version(ev: HotLoadEvent) -> int:
    return ev.version if ev.version is not None else -1


def version_violations(
    records: Sequence[RequestRecord],
    events: Sequence[HotLoadEvent],
    versions: dict[int, frozenset[str]],
    *,
    floor_kinds: tuple[str, ...] = LM_KINDS,
) -> list[dict[str, Any]]:
    """Responses that cannot have been served by one pool version.

    A response reporting version v must (1) name only expert sets present at v, (2) not
    come from a version no operation created, or from one whose operation started after the
    response ended, and (3) for `floor_kinds` (the model the scenario loads sets into), not
    predate a commit answered before the request was sent. Other models see the cluster
    version move only when they next reconcile (a few seconds), so (3) does not apply there.
    """
    bad = []
    committed = [e for e in events if e.ok and e.version is not None]
    known_max = max(versions) if versions else None
    for r in records:
        if not r.ok or r.pool_version is None:
            continue
        v = r.pool_version
        floor = max((e.version for e in committed if e.end <= r.start), default=None)
        problem = None
        if v in versions and not set(r.expert_sets) <= versions[v]:
            problem = f"sets not in version: {sorted(set(r.expert_sets) - versions[v])}"
        elif r.kind in floor_kinds and floor is not None and v < floor:
            problem = f"older than committed {floor}"
        elif known_max is not None and v > known_max:
            problem = "version no operation created"
        elif any(e.version == v and e.start > r.end for e in committed):
            problem = "version from the future"
        if problem:
            bad.append({"id": r.id, "kind": r.kind, "version": v, "problem": problem})
    return bad


def hotload_block(
    records: Sequence[RequestRecord],
    events: Sequence[HotLoadEvent],
    *,
    initial_version: int,
    initial_sets: Iterable[str],
) -> dict[str, Any]:
    """Failed requests (must be 0), latency during swaps vs outside, version consistency."""
    versions = sets_by_version(initial_version, initial_sets, events)
    during = [r for r in records if overlaps(r, events)]
    outside = [r for r in records if not overlaps(r, events)]
    violations = version_violations(records, events, versions)
    loads = [e for e in events if e.action == "load"]
    return {
        "operations": len(events),
        "loads_ok": sum(1 for e in loads if e.ok),
        "loads_failed": sum(1 for e in loads if not e.ok),
        "retires_ok": sum(1 for e in events if e.action == "retire" and e.ok),
        "operation_s": distribution(e.end - e.start for e in events if e.ok),
        "failed_requests": sum(1 for r in records if not r.ok),
        "failed_requests_during_swaps": sum(1 for r in during if not r.ok),
        "during_swaps": latency_block(during),
        "outside_swaps": latency_block(outside),
        "versions": {str(v): sorted(s) for v, s in sorted(versions.items())},
        "mixed_version_responses": len(violations),
        "violations": violations[:20],
        "passed": all(e.ok for e in events)
        and not violations
        and not any(not r.ok for r in records),
    }
