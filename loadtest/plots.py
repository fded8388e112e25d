"""PNG plots of a run: latency CDFs, and throughput over time with hot-load events marked.

Small on purpose (about 900 x 300 px): they go into docs/ and reviews.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadtest.metrics import e2e, itl_gaps, ttft
from loadtest.runner import RunResult

DPI = 90


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, values: list[float], label: str) -> None:
    if not values:
        return
    ordered = sorted(v * 1000 for v in values)
    n = len(ordered)
    ax.step(ordered, [(i + 1) / n for i in range(n)], where="post", label=f"{label} (n={n})")


def latency_cdfs(result: RunResult, path: Path) -> Path:
    """One panel each for TTFT, ITL and end-to-end latency; one line per request kind."""
    plt = _pyplot()
    measured = [r for r in result.records if r.ok and not r.warmup]
    kinds = sorted({r.kind for r in measured})
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2), dpi=DPI)
    panels = (
        ("time to first token", lambda rs: [t for r in rs if (t := ttft(r)) is not None]),
        ("inter-token latency", lambda rs: [g for r in rs for g in itl_gaps(r)]),
        ("end-to-end latency", lambda rs: [e2e(r) for r in rs]),
    )
    for ax, (title, pick) in zip(axes, panels, strict=True):
        for kind in kinds:
            _cdf(ax, pick([r for r in measured if r.kind == kind]), kind)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("ms", fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("fraction of samples", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def throughput(result: RunResult, summary: dict[str, Any], path: Path) -> Path:
    """Requests/s and output tokens/s per second of the run; hot-loads as shaded spans."""
    plt = _pyplot()
    series = summary["timeseries"]
    t = series["t_s"]
    fig, ax = plt.subplots(figsize=(10, 3.2), dpi=DPI)
    ax.plot(t, series["output_tokens_per_s"], color="tab:blue", label="output tokens/s")
    ax.set_xlabel("seconds since start", fontsize=9)
    ax.set_ylabel("tokens/s", fontsize=9, color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(t, series["requests_per_s"], color="tab:green", label="requests/s completed")
    if any(series["failures_per_s"]):
        ax2.plot(t, series["failures_per_s"], color="tab:red", label="failures/s")
    ax2.set_ylabel("requests/s", fontsize=9, color="tab:green")
    warmup = result.config.warmup_s
    if warmup:
        ax.axvspan(0, warmup, color="grey", alpha=0.15, label="warm-up (excluded)")
    for i, ev in enumerate(result.events):
        ax.axvspan(ev.start, max(ev.end, ev.start + 0.15), color="tab:purple", alpha=0.35,
                   label="hot-load" if i == 0 else None)  # fmt: skip
        ax.annotate(f"v{ev.version}" if ev.ok else "failed", (ev.start, 1.0),
                    xycoords=("data", "axes fraction"), fontsize=7, va="bottom")  # fmt: skip
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    ax2.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_all(result: RunResult, summary: dict[str, Any], out_dir: Path) -> list[str]:
    files = [latency_cdfs(result, out_dir / "latency_cdf.png")]
    files.append(throughput(result, summary, out_dir / "throughput.png"))
    return [f.name for f in files]
