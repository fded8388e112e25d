"""Summarising the peers benchmark: medians and mora/llama ratios, the Markdown table, the plot.

Pure functions of the measurements, so the arithmetic is tested without servers. A ratio is
taken within a pair (the mora run and the llama-server run measured back to back, at the
same concurrency, in the same round and pool phase), and a row reports the median of its
pairs' ratios: the machine's speed drifts within minutes, and pairs cancel most of that.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

LLAMA, MORA = "llama", "mora"
POOLS = ("empty", "loaded")


@dataclass(frozen=True)
class Measurement:
    """One closed-loop run against one server."""

    round: int
    pool: str  # the pool phase it ran in: "empty" or "loaded" (llama-server has no pool)
    concurrency: int
    server: str  # LLAMA or MORA
    tokens_per_s: float
    tokens_per_request: float
    prompt_tokens_per_request: float


@dataclass(frozen=True)
class Row:
    """One pool phase at one concurrency, over the rounds."""

    pool: str
    concurrency: int
    llama_tps: float  # medians over rounds
    mora_tps: float
    ratio: float  # median of the pairs' mora / llama ratios
    ratios: tuple[float, ...]  # per round, in round order
    llama_tokens_per_request: float
    mora_tokens_per_request: float
    llama_prompt_tokens: float
    mora_prompt_tokens: float


def summarise(measurements: Iterable[Measurement]) -> list[Row]:
    """Rows in pool order, then concurrency; a (round, pool, concurrency) must have both
    servers' runs to count (a pair missing one side is left out)."""
    runs: dict[tuple[str, int, int], dict[str, Measurement]] = {}
    for m in measurements:
        if m.server not in (LLAMA, MORA):
            raise ValueError(f"unknown server {m.server!r}")
        runs.setdefault((m.pool, m.concurrency, m.round), {})[m.server] = m
    pairs: dict[tuple[str, int], list[tuple[Measurement, Measurement]]] = {}
    for (pool, concurrency, _round), both in sorted(runs.items()):
        if LLAMA in both and MORA in both:
            pairs.setdefault((pool, concurrency), []).append((both[LLAMA], both[MORA]))
    rows = []
    for (pool, concurrency), found in sorted(pairs.items(), key=lambda kv: _pool_key(kv[0])):
        llama = [pair[0] for pair in found]
        mora = [pair[1] for pair in found]
        ratios = tuple(m.tokens_per_s / ll.tokens_per_s for ll, m in found)
        rows.append(
            Row(
                pool=pool,
                concurrency=concurrency,
                llama_tps=statistics.median(r.tokens_per_s for r in llama),
                mora_tps=statistics.median(r.tokens_per_s for r in mora),
                ratio=statistics.median(ratios),
                ratios=ratios,
                llama_tokens_per_request=statistics.mean(r.tokens_per_request for r in llama),
                mora_tokens_per_request=statistics.mean(r.tokens_per_request for r in mora),
                llama_prompt_tokens=statistics.mean(r.prompt_tokens_per_request for r in llama),
                mora_prompt_tokens=statistics.mean(r.prompt_tokens_per_request for r in mora),
            )
        )
    return rows


def _pool_key(key: tuple[str, int]) -> tuple[int, int]:
    pool, concurrency = key
    return (POOLS.index(pool) if pool in POOLS else len(POOLS), concurrency)


def markdown_table(rows: list[Row], pool_labels: dict[str, str]) -> str:
    lines = [
        "| mora pool | concurrency | llama-server tokens/s | mora tokens/s | mora / llama "
        "| per round | tokens/request (llama / mora) | prompt tokens (llama / mora) |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        per_round = ", ".join(f"{r:.2f}" for r in row.ratios)
        lines.append(
            f"| {pool_labels.get(row.pool, row.pool)} | {row.concurrency} | {row.llama_tps:.1f} "
            f"| {row.mora_tps:.1f} | {row.ratio:.2f}x | {per_round} "
            f"| {row.llama_tokens_per_request:.1f} / {row.mora_tokens_per_request:.1f} "
            f"| {row.llama_prompt_tokens:.1f} / {row.mora_prompt_tokens:.1f} |"
        )
    return "\n".join(lines) + "\n"


def prompt_mismatches(rows: list[Row], tolerance: float = 0.5) -> list[Row]:
    """Rows whose servers counted different prompt lengths: they did not see the same tokens
    (a tokenizer or chat-template difference), and the comparison is not like for like."""
    return [r for r in rows if abs(r.llama_prompt_tokens - r.mora_prompt_tokens) > tolerance]


def plot(rows: list[Row], pool_labels: dict[str, str], path: Path) -> Path:
    """Tokens/s against concurrency: mora per pool state, llama-server alongside each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=90)
    for i, pool in enumerate(sorted({r.pool for r in rows}, key=lambda p: _pool_key((p, 0)))):
        mine = [r for r in rows if r.pool == pool]
        x = [r.concurrency for r in mine]
        label = pool_labels.get(pool, pool)
        color = f"C{i}"
        ax.plot(x, [r.mora_tps for r in mine], "o-", color=color, label=f"mora, {label}")
        ax.plot(
            x,
            [r.llama_tps for r in mine],
            "s--",
            color=color,
            alpha=0.7,
            label=f"llama-server (runs paired with mora, {label})",
        )
    ax.set_xscale("log", base=2)
    ticks = sorted({r.concurrency for r in rows})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("concurrent clients (closed loop)")
    ax.set_ylabel("output tokens/s (median over rounds)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
