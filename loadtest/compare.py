"""`python -m loadtest compare BASE.json NEW.json`: flag regressions beyond a tolerance.

A latency percentile regresses when NEW > BASE * (1 + tolerance) and the difference is above
an absolute floor (sub-millisecond noise is not a regression); a throughput regresses when
NEW < BASE * (1 - tolerance); the error rate regresses when it grows by more than
`max_error_increase` (absolute). Exit status: 0 no regression, 1 regression, 2 bad input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.report import SCHEMA

LATENCIES = ("ttft_s", "itl_s", "tpot_s", "e2e_s")
LATENCY_PERCENTILES = ("p50", "p95", "p99")
THROUGHPUTS = ("requests_per_s", "output_tokens_per_s")


class CompareError(ValueError):
    """An input that is not a load-test summary of a known schema."""


@dataclass(frozen=True)
class Check:
    metric: str
    base: float
    new: float
    change: float  # relative, new / base - 1 (or absolute for the error rate)
    regression: bool


def load_summary(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CompareError(f"{path}: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise CompareError(f"{path}: not a {SCHEMA} summary")
    return data


def compare(
    base: dict[str, Any],
    new: dict[str, Any],
    *,
    tolerance: float = 0.10,
    abs_floor_s: float = 0.002,
    max_error_increase: float = 0.01,
) -> list[Check]:
    checks: list[Check] = []
    for kind, block in base["latency"].items():
        other = new["latency"].get(kind)
        if other is None:
            continue
        for metric in LATENCIES:
            for p in LATENCY_PERCENTILES:
                a, b = block[metric].get(p), other[metric].get(p)
                if a is None or b is None:
                    continue
                worse = b > a * (1 + tolerance) and b - a > abs_floor_s
                checks.append(Check(f"{kind}.{metric}.{p}", a, b, _rel(a, b), worse))
    for metric in THROUGHPUTS:
        a, b = base["throughput"][metric], new["throughput"][metric]
        if a:
            checks.append(Check(f"throughput.{metric}", a, b, _rel(a, b), b < a * (1 - tolerance)))
    a, b = base["errors"]["rate"], new["errors"]["rate"]
    checks.append(Check("errors.rate", a, b, b - a, b - a > max_error_increase))
    hot = new.get("hotload")
    if hot is not None:
        failed = float(hot["failed_requests"] + hot["mixed_version_responses"])
        checks.append(Check("hotload.failed_or_mixed", 0.0, failed, failed, failed > 0))
    return checks


def _rel(a: float, b: float) -> float:
    return b / a - 1 if a else 0.0


def render(checks: list[Check]) -> str:
    lines = [f"{'metric':<34}{'base':>12}{'new':>12}{'change':>9}"]
    for c in checks:
        flag = "  REGRESSION" if c.regression else ""
        lines.append(f"{c.metric:<34}{c.base:>12.4g}{c.new:>12.4g}{c.change:>+9.1%}{flag}")
    bad = sum(c.regression for c in checks)
    lines.append(f"{bad} regression(s) in {len(checks)} checks")
    return "\n".join(lines)
