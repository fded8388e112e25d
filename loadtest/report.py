"""Turn a run into its outputs: summary.json (versioned), requests.jsonl, plots, and text.

The server's own view comes from two scrapes of its Prometheus endpoint (before and after
the run): counters and histogram sums/counts are differenced, gauges are read after.
Series are summed over replicas (labels outside `KEEP_LABELS` are dropped).
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from loadtest.metrics import FORMULAS, hotload_block, summarize, timeseries
from loadtest.runner import RunResult

SCHEMA = "mora-loadtest/1"
KEEP_LABELS = ("model", "module_kind", "endpoint", "code", "expert_set", "result")
GAUGES = ("mora_pool_experts", "mora_pool_version", "mora_num_requests_running",
          "mora_num_requests_waiting")  # fmt: skip


def parse_scrape(text: str | None) -> dict[str, float]:
    """`name{kept labels}` -> value, summed over replicas, for the server's mora_* series."""
    if not text:
        return {}
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix("ray_")
            if not name.startswith("mora_") or name.endswith("_bucket"):
                continue
            labels = ",".join(
                f'{k}="{sample.labels[k]}"' for k in KEEP_LABELS if k in sample.labels
            )
            out[f"{name}{{{labels}}}" if labels else name] += sample.value
    return dict(out)


def mora_lines(text: str | None) -> str:
    """The scrape's lines about mora_* metrics (samples and their HELP/TYPE comments)."""

    def name(line: str) -> str:
        if line.startswith("#"):
            parts = line.split(" ", 3)
            return parts[2] if len(parts) > 2 else ""
        return line.split("{", 1)[0].split(" ", 1)[0]

    keep = [line for line in (text or "").splitlines() if "mora_" in name(line)]
    return "\n".join(keep) + "\n" if keep else ""


def server_view(before: str | None, after: str | None) -> dict[str, Any]:
    """What the server counted during the run, from the two scrapes."""
    if after is None:
        return {"available": False}
    try:
        a, b = parse_scrape(before), parse_scrape(after)
    except ValueError as exc:  # not Prometheus text exposition
        return {"available": False, "error": f"unparsable scrape: {str(exc)[:200]}"}
    deltas = {
        key: value - a.get(key, 0.0)
        for key, value in b.items()
        if not key.startswith(GAUGES) and value - a.get(key, 0.0) != 0
    }
    gauges = {key: value for key, value in b.items() if key.startswith(GAUGES)}

    def total(prefix: str) -> float:
        return sum(v for k, v in deltas.items() if k.split("{")[0] == prefix)

    ranks_n = total("mora_active_ranks_per_token_count")
    ttft_n = total("mora_time_to_first_token_seconds_count")
    itl_n = total("mora_inter_token_latency_seconds_count")
    return {
        "available": True,
        "scrape_before": before is not None,
        "mean_active_ranks_per_token": total("mora_active_ranks_per_token_sum") / ranks_n
        if ranks_n
        else None,
        "tokens_routed": ranks_n,
        "mean_ttft_s": total("mora_time_to_first_token_seconds_sum") / ttft_n if ttft_n else None,
        "mean_itl_s": total("mora_inter_token_latency_seconds_sum") / itl_n if itl_n else None,
        "generation_tokens": total("mora_generation_tokens_total"),
        "requests_by_code": {
            k.split("{", 1)[1].rstrip("}"): v
            for k, v in deltas.items()
            if k.startswith("mora_requests_total{")
        },
        "deltas": dict(sorted(deltas.items())),
        "gauges_after": dict(sorted(gauges.items())),
    }


def build_summary(result: RunResult, *, bin_s: float | None = None) -> dict[str, Any]:
    cfg = result.config
    summary: dict[str, Any] = {
        "schema": SCHEMA,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(result.started_at)),
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        "config": cfg.describe(),
        "model": result.model,
        "formulas": FORMULAS,
        **summarize(
            result.records,
            duration_s=cfg.duration_s,
            warmup_s=cfg.warmup_s,
            target_rate=None if cfg.concurrency else cfg.rate,
        ),
    }
    summary["requests"]["not_sent_client_limit"] = result.not_sent
    summary["wall_s"] = result.wall_s
    summary["timeseries"] = timeseries(
        result.records, bin_s=bin_s or (1.0 if cfg.duration_s < 60 else 2.0)
    )
    summary["hotload"] = None
    if cfg.hotload_paths:
        pool = result.initial_pool or {}
        summary["hotload"] = {
            "every_s": cfg.hotload_every_s,
            "events": [e.__dict__ for e in result.events],
            "cleanup": [e.__dict__ for e in result.cleanup],
            **hotload_block(
                result.records,
                result.events,
                initial_version=int(pool.get("version", 0)),
                initial_sets=[s["name"] for s in pool.get("sets", [])],
            ),
        }
    summary["server_metrics"] = server_view(result.scrape_before, result.scrape_after)
    summary["server_metrics"]["scrape_errors"] = result.scrape_errors
    return _clean(summary)


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_outputs(result: RunResult, out_dir: Path, *, plots: bool = True) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = build_summary(result)
    with open(out_dir / "requests.jsonl", "w") as fh:
        for record in result.records:
            fh.write(json.dumps(_clean(record.to_json())) + "\n")
    if result.scrape_after is not None:  # Ray's own series would swamp these files
        (out_dir / "metrics_before.prom").write_text(mora_lines(result.scrape_before))
        (out_dir / "metrics_after.prom").write_text(mora_lines(result.scrape_after))
    summary["files"] = ["summary.json", "requests.jsonl"]
    if plots:
        from loadtest.plots import plot_all

        summary["files"] += plot_all(result, summary, out_dir)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def render_text(summary: dict[str, Any]) -> str:
    """The human-readable report printed at the end of a run."""
    req, thr, err = summary["requests"], summary["throughput"], summary["errors"]
    lines = [
        f"MoRA load test ({summary['schema']}), model {summary.get('model')}, "
        f"{summary['config']['mode']} loop, measured {summary['window']['measured_s']:.1f} s "
        f"after {summary['window']['warmup_s']:g} s warm-up",
        f"requests: {req['measured']} measured ({req['warmup_excluded']} warm-up excluded), "
        f"{req['succeeded']} ok, {req['failed']} failed, {req['not_sent_client_limit']} not "
        f"sent (client limit)",
        f"throughput: {thr['requests_per_s']:.2f} req/s, {thr['output_tokens_per_s']:.1f} "
        f"output tok/s; achieved rate {thr['achieved_rate_per_s']:.2f}/s"
        + (f" (target {thr['target_rate_per_s']:g}/s)" if thr["target_rate_per_s"] else ""),
        f"errors: {err['count']} ({err['rate']:.1%}) {err['by_type'] or ''}",
        "",
        f"{'latency (ms)':<24}{'n':>6}{'p50':>9}{'p90':>9}{'p95':>9}{'p99':>9}",
    ]
    for kind, block in summary["latency"].items():
        for metric in ("ttft_s", "itl_s", "tpot_s", "e2e_s"):
            d = block[metric]
            if not d["count"]:
                continue
            lines.append(
                f"{kind + ' ' + metric[:-2]:<24}{d['count']:>6}"
                + "".join(f"{_ms(d[p]):>9}" for p in ("p50", "p90", "p95", "p99"))
            )
    mora = summary["mora"]
    ranks = mora["active_ranks_per_token"]
    if ranks["count"]:
        lines += [
            "",
            f"ranks activated per token (per response): mean {ranks['mean']:.2f}, "
            f"p50 {ranks['p50']:.2f}, p99 {ranks['p99']:.2f}; pool versions seen "
            f"{mora['pool_versions_seen']}",
        ]
    server = summary["server_metrics"]
    if server.get("available") and server.get("mean_active_ranks_per_token") is not None:
        lines.append(
            f"server: mean ranks/token {server['mean_active_ranks_per_token']:.2f} over "
            f"{server['tokens_routed']:.0f} tokens, {server['generation_tokens']:.0f} tokens "
            f"generated, requests {server['requests_by_code']}"
        )
    hot = summary.get("hotload")
    if hot:
        during, outside = hot["during_swaps"]["e2e_s"], hot["outside_swaps"]["e2e_s"]
        lines += [
            "",
            f"hot-load: {hot['loads_ok']} loads ok, {hot['loads_failed']} failed, every "
            f"{hot['every_s']:g} s; operation p50 {_ms(hot['operation_s']['p50'])} ms",
            f"  failed requests: {hot['failed_requests']} (must be 0); mixed-version "
            f"responses: {hot['mixed_version_responses']} (must be 0)",
            f"  e2e during swaps: n={during['count']} p50 {_ms(during['p50'])} p99 "
            f"{_ms(during['p99'])} ms; outside: n={outside['count']} p50 "
            f"{_ms(outside['p50'])} p99 {_ms(outside['p99'])} ms",
            f"  {'PASSED' if hot['passed'] else 'FAILED'}",
        ]
    return "\n".join(lines)
