"""Write an evaluation report: `eval_<suite>.json`, `.md` (tables) and `.png` (heatmaps)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .plots import plot_matrices

_METRIC_NAMES = (("transfer", "Transfer"), ("average", "Average"), ("last", "Last"), ("bwt", "BWT"))


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def markdown(report: dict[str, Any]) -> str:
    tasks = report["tasks"]
    methods = report["methods"]
    cfg = report["config"]
    lines = [
        f"# MoRA continual-learning evaluation: {report['suite']} suite",
        "",
        f"Model `{report['model']}`; tasks in order: {', '.join(tasks)}. "
        f"{cfg['steps']} steps per task, batch {cfg['batch_size']}, lr {cfg['lr']}, "
        f"rank {cfg['rank']}, top-k {cfg['top_k']}, tau {cfg['tau']}, "
        f"threshold {cfg['threshold']}, scale {cfg['scale']}, seed {cfg['seed']}. "
        f"Trainable parameters per task: {report['trainable_parameters_per_task']['mora']:,} "
        "(MoRA and each LoRA alike). Accuracy in %; no task id at test time except for "
        "`lora-oracle`.",
        "",
        "## Metrics",
        "",
    ]
    rows = []
    for name, run in methods.items():
        metrics = run["metrics"]
        rows.append(
            [f"`{name}`"]
            + [_fmt(metrics[key]) for key, _ in _METRIC_NAMES]
            + [_fmt(run["train_seconds"], 0), _fmt(run["eval_seconds"], 0)]
        )
    header = ["method", *(label for _, label in _METRIC_NAMES), "train s", "eval s"]
    lines += _table(header, rows)
    spaces = report.get("label_spaces") or {}
    if any("alt_metrics" in run for run in methods.values()):
        lines += ["", f"Label space: {spaces.get('matrix', 'see JSON')}.", ""]
        lines += [f"### Without the base labels ({spaces.get('alt_matrix', 'alt')})", ""]
        rows = [
            [f"`{name}`", *(_fmt(run["alt_metrics"][key]) for key, _ in _METRIC_NAMES)]
            for name, run in methods.items()
            if "alt_metrics" in run
        ]
        lines += _table(["method", *(label for _, label in _METRIC_NAMES)], rows)
    lines += [
        "",
        "Transfer: mean accuracy on tasks not learned yet (upper triangle); Average: mean of "
        "the matrix; Last: mean after the final task; BWT: mean drop from just after learning "
        "a task to the end (positive = forgetting).",
        "",
    ]
    if "mora" in methods and "routing" in methods["mora"]:
        lines += _routing_section(tasks, methods["mora"])
    probe = report.get("probe_task")
    if probe and any("probe_accuracy" in run for run in methods.values()):
        lines += [f"## Pre-training domain `{probe}` (not learned; same label space)", ""]
        header = ["method", *(f"after {t}" for t in tasks)]
        rows = [
            [f"`{name}`", *(_fmt(v) for v in run["probe_accuracy"])]
            for name, run in methods.items()
            if "probe_accuracy" in run
        ]
        lines += [*_table(header, rows), ""]
    lines += ["## Accuracy matrices (row: after learning task i; column: task j)", ""]
    for name, run in methods.items():
        rows = [
            [f"after {tasks[i]}", *(_fmt(v) for v in row)] for i, row in enumerate(run["matrix"])
        ]
        lines += [f"### `{name}`", "", *_table(["", *tasks], rows), ""]
        if "alt_matrix" in run:
            rows = [
                [f"after {tasks[i]}", *(_fmt(v) for v in row)]
                for i, row in enumerate(run["alt_matrix"])
            ]
            lines += [f"`{name}` without the base labels:", "", *_table(["", *tasks], rows), ""]
    seconds = report["seconds"]
    lines += [
        f"Total wall time {seconds['total']:.0f} s (setup {seconds['setup']:.0f} s) on "
        f"{report['environment']['cpus']} CPU core(s), torch {report['environment']['torch']}.",
        "",
    ]
    return "\n".join(lines)


def _routing_section(tasks: Sequence[str], run: dict[str, Any]) -> list[str]:
    purity = run["routing"]["purity"]
    ranks = run["routing"]["active_ranks"]
    last = len(tasks) - 1
    rows = [
        [
            task,
            _fmt(purity[j][j]),
            _fmt(purity[last][j]),
            _fmt(ranks[j][j], 2),
            _fmt(ranks[last][j], 2),
        ]
        for j, task in enumerate(tasks)
    ]
    header = [
        "task",
        "purity just after learning",
        "purity at the end",
        "active ranks / token just after",
        "active ranks / token at the end",
    ]
    return [
        "## MoRA routing",
        "",
        "Purity: share of activated ranks (token x layer x expert) that belong to the task's "
        "own expert set; active ranks: mean experts active per token and adapted layer.",
        "",
        *_table(header, rows),
        "",
    ]


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(report: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"eval_{report['suite']}"
    files = {
        "json": str(out / f"{stem}.json"),
        "markdown": str(out / f"{stem}.md"),
        "png": str(out / f"{stem}.png"),
    }
    matrices = {name: run["matrix"] for name, run in report["methods"].items()}
    matrices |= {
        f"{name} (no base labels)": run["alt_matrix"]
        for name, run in report["methods"].items()
        if "alt_matrix" in run
    }
    plot_matrices(
        files["png"], matrices, report["tasks"], title=f"{report['suite']} suite: accuracy (%)"
    )
    body = json.dumps({**report, "files": files}, indent=2) + "\n"
    _write_atomic(Path(files["json"]), body.encode())
    _write_atomic(Path(files["markdown"]), markdown(report).encode())
    return files
