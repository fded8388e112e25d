"""The soak scenario's outputs: soak_summary.json, soak_rss.png and a text report.

Memory growth is judged by a least-squares slope over the second half of the run only: the
first half holds start-up allocation (allocator arenas, caches warming up, the first loads),
which a server that plateaus also shows.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.soak import SoakResult

SCHEMA = "mora-loadtest-soak/1"
MB = 1e6
FORMULAS = {
    "rss": "resident set size of each replica process (/proc/self/statm, the replica's "
    "mora_replica_rss_bytes gauge, refreshed every few seconds), scraped every sample_every_s",
    "slope": "least-squares slope of RSS (MB = 1e6 bytes) against time (minutes) over the "
    "samples taken at or after fit_from_s = duration_s / 2",
    "storm": "a storm stream is 'dropped' when the client closes the connection after the "
    "first chunk carrying text (or after storm_patience_s without one)",
}


def least_squares_slope(ts: Sequence[float], ys: Sequence[float]) -> float | None:
    """Slope of the least-squares line through (ts, ys); None with < 2 distinct times."""
    n = len(ts)
    if n != len(ys):
        raise ValueError("ts and ys differ in length")
    if n < 2:
        return None
    mean_t = sum(ts) / n
    mean_y = sum(ys) / n
    var = sum((t - mean_t) ** 2 for t in ts)
    if var == 0:
        return None
    return sum((t - mean_t) * (y - mean_y) for t, y in zip(ts, ys, strict=True)) / var


def rss_slope(ts: Sequence[float], rss_bytes: Sequence[float], fit_from_s: float) -> dict[str, Any]:
    """MB per minute over the samples at or after `fit_from_s`, with what the fit used."""
    points = [(t, y) for t, y in zip(ts, rss_bytes, strict=True) if t >= fit_from_s]
    slope = least_squares_slope([t / 60 for t, _ in points], [y / MB for _, y in points])
    return {
        "slope_mb_per_min": slope,
        "fit_from_s": fit_from_s,
        "fit_points": len(points),
        "fit_span_s": points[-1][0] - points[0][0] if points else 0.0,
    }


def rss_series(result: SoakResult) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {}
    for s in sorted(result.samples, key=lambda s: s.t):
        series = out.setdefault(s.series, {"t_s": [], "rss_mb": []})
        series["t_s"].append(round(s.t, 3))
        series["rss_mb"].append(round(s.rss_bytes / MB, 3))
    return out


def rss_block(result: SoakResult) -> dict[str, Any]:
    series = rss_series(result)
    fit_from = result.config.duration_s / 2
    stats = {}
    for name, s in series.items():
        ys = s["rss_mb"]
        stats[name] = {
            "samples": len(ys),
            "first_mb": ys[0],
            "last_mb": ys[-1],
            "min_mb": min(ys),
            "max_mb": max(ys),
            **rss_slope(s["t_s"], [y * MB for y in ys], fit_from),
        }
    return {"sample_every_s": result.config.sample_every_s, "stats": stats, "series": series}


def requests_block(result: SoakResult) -> dict[str, Any]:
    by_kind: dict[str, dict[str, int]] = {}
    for r in result.records:
        entry = by_kind.setdefault(r.kind, {"sent": 0, "ok": 0, "failed": 0})
        entry["sent"] += 1
        entry["ok" if r.ok else "failed"] += 1
    errors = Counter(r.error for r in result.records if not r.ok)
    return {
        "sent": len(result.records),
        "ok": sum(r.ok for r in result.records),
        "failed": sum(not r.ok for r in result.records),
        "by_kind": dict(sorted(by_kind.items())),
        "errors_by_type": dict(sorted(errors.items())),
        "error_examples": sorted({r.error_message or "" for r in result.records if not r.ok})[:5],
    }


def storms_block(result: SoakResult) -> dict[str, Any]:
    totals: Counter[str] = Counter()
    for storm in result.storms:
        totals.update(storm.counts())
    # Dropping is the point; a 503 is the server shedding load as designed. Anything else
    # (a 5xx other than 503, a connection error) is the server failing under the storm.
    unexpected = sum(
        n for k, n in totals.items() if not (k.startswith("dropped") or k == "http_503")
    )
    return {
        "count": len(result.storms),
        "streams": sum(totals.values()),
        "outcomes": dict(sorted(totals.items())),
        "unexpected": unexpected,
        "storms": [
            {"at_s": round(s.at, 3), "outcomes": s.counts(), "errors": _storm_errors(s)}
            for s in result.storms
        ],
    }


def _storm_errors(storm) -> list[str]:
    return sorted({s.error for s in storm.streams if s.error})[:3]


def churn_block(result: SoakResult) -> dict[str, Any]:
    ops = result.churn
    return {
        "every_s": result.config.churn_every_s,
        "max_loaded": result.config.max_loaded,
        "loads_ok": sum(e.ok for e in ops if e.action == "load"),
        "retires_ok": sum(e.ok for e in ops if e.action == "retire"),
        "failed": sum(not e.ok for e in ops),
        "skipped": len(result.churn_skipped),
        "events": [e.__dict__ for e in ops],
        "cleanup": [e.__dict__ for e in result.cleanup],
    }


def build_summary(result: SoakResult, max_slope_mb_per_min: float | None = None) -> dict:
    cfg = result.config
    rss = rss_block(result)
    requests = requests_block(result)
    storms = storms_block(result)
    churn = churn_block(result)
    replica_slopes = {
        name: s["slope_mb_per_min"]
        for name, s in rss["stats"].items()
        if name.startswith("replica:")
    }
    checks = {
        "steady_requests_failed": requests["failed"],
        "churn_operations_failed": churn["failed"],
        "storm_streams_unexpected": storms["unexpected"],
        "replicas_sampled": len(replica_slopes),
        "max_slope_mb_per_min": max_slope_mb_per_min,
        "replicas_over_slope": sorted(
            name
            for name, slope in replica_slopes.items()
            if max_slope_mb_per_min is not None
            and slope is not None
            and slope > max_slope_mb_per_min
        ),
    }
    passed = (
        requests["failed"] == 0
        and churn["failed"] == 0
        and storms["unexpected"] == 0
        and bool(replica_slopes)
        and not checks["replicas_over_slope"]
    )
    return _clean(
        {
            "schema": SCHEMA,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(result.started_at)),
            "config": cfg.describe(),
            "model": result.model,
            "wall_s": round(result.wall_s, 3),
            "formulas": FORMULAS,
            "passed": passed,
            "checks": checks,
            "requests": requests,
            "storms": storms,
            "churn": churn,
            "rss": rss,
            "scrape_errors": result.scrape_errors[:20],
        }
    )


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def render_text(summary: dict[str, Any]) -> str:
    req, storms, churn = summary["requests"], summary["storms"], summary["churn"]
    cfg = summary["config"]
    lines = [
        f"MoRA soak ({summary['schema']}), model {summary['model']}, {cfg['duration_s']:g} s, "
        f"{cfg['concurrency']} steady users",
        f"steady requests: {req['sent']} sent, {req['ok']} ok, {req['failed']} failed "
        f"{req['errors_by_type'] or ''}",
        f"churn: {churn['loads_ok']} loads + {churn['retires_ok']} retires ok, "
        f"{churn['failed']} failed, {churn['skipped']} skipped (every {churn['every_s']:g} s)",
        f"storms: {storms['count']} x {cfg['storm_size']} streams: {storms['outcomes']}",
        "",
        f"{'RSS (MB)':<48}{'first':>8}{'last':>8}{'max':>8}{'MB/min':>9}{'points':>8}",
    ]
    for name, s in summary["rss"]["stats"].items():
        slope = s["slope_mb_per_min"]
        lines.append(
            f"{name[:47]:<48}{s['first_mb']:>8.1f}{s['last_mb']:>8.1f}{s['max_mb']:>8.1f}"
            f"{'-' if slope is None else f'{slope:+.2f}':>9}{s['fit_points']:>8}"
        )
    lines += ["", f"slope fitted from t = {cfg['duration_s'] / 2:g} s; "
              f"{'PASSED' if summary['passed'] else 'FAILED'} {summary['checks']}"]  # fmt: skip
    return "\n".join(lines)


def plot_rss(result: SoakResult, summary: dict[str, Any], path: Path) -> Path:
    """RSS per replica over the run (fitted line dashed), storms and churn marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rss = summary["rss"]
    fig, ax = plt.subplots(figsize=(10, 3.6), dpi=90)
    # The replicas' own gauges; Ray's per-process series only for a server without them.
    names = [n for n in rss["series"] if n.startswith("replica:")]
    names = names or [n for n in rss["series"] if "ServeReplica" in n]
    for name in names:
        s = rss["series"][name]
        (line,) = ax.plot(s["t_s"], s["rss_mb"], marker=".", markersize=3, label=name[:60])
        stat = rss["stats"][name]
        slope = stat["slope_mb_per_min"]
        points = [(t, y) for t, y in zip(s["t_s"], s["rss_mb"], strict=True)
                  if t >= stat["fit_from_s"]]  # fmt: skip
        if slope is not None and points:
            t0 = sum(t for t, _ in points) / len(points)
            y0 = sum(y for _, y in points) / len(points)
            ends = (points[0][0], points[-1][0])
            ax.plot(ends, [y0 + slope * (t - t0) / 60 for t in ends], "--",
                    color=line.get_color(), linewidth=1,
                    label=f"fit {slope:+.2f} MB/min")  # fmt: skip
    for i, storm in enumerate(result.storms):
        ax.axvline(storm.at, color="tab:red", alpha=0.4, linewidth=1,
                   label="disconnect storm" if i == 0 else None)  # fmt: skip
    for i, ev in enumerate(result.churn):
        ax.axvline(ev.start, color="tab:purple", alpha=0.12, linewidth=1,
                   label="load / retire" if i == 0 else None)  # fmt: skip
    ax.axvline(result.config.duration_s / 2, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("seconds since start", fontsize=9)
    ax.set_ylabel("RSS (MB)", fontsize=9)
    ax.set_title("replica resident memory under churn, storms and steady traffic", fontsize=10)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_soak_outputs(
    result: SoakResult,
    out_dir: Path,
    *,
    plots: bool = True,
    max_slope_mb_per_min: float | None = None,
) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = build_summary(result, max_slope_mb_per_min)
    summary["files"] = ["soak_summary.json"]
    if plots:
        summary["files"].append(plot_rss(result, summary, out_dir / "soak_rss.png").name)
    (out_dir / "soak_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
