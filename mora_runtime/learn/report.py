"""Write an evaluation report: `eval_<suite>.json`, `.md` (tables) and `.png` (heatmaps).

Besides each method's own metrics, the report compares every method with the frozen base
(`zero-shot`, when it ran): the share of each task's learned gain kept at the end
(`metrics.gain_kept`), and the base domain's accuracy before the sequence (the frozen base, in
the last stage's label space) and after it (the method after its last task), for suites with
a base domain (CLIP's pre-training domain; the LM suite has none).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mora_runtime.learn.metrics import MIN_GAIN, gain_kept
from mora_runtime.learn.plots import plot_matrices

_METRIC_NAMES = (("transfer", "Transfer"), ("average", "Average"), ("last", "Last"), ("bwt", "BWT"))


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def derived_metrics(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method: `gain_kept` (and `alt_gain_kept`) against the zero-shot run, None without
    one; `base_domain` {before, after} when the suite has a base domain."""
    tasks = report["tasks"]
    methods = report["methods"]
    zero = methods.get("zero-shot")
    has_base = bool(report.get("probe_task"))
    before = _final(zero.get("probe_accuracy")) if zero else None
    out: dict[str, dict[str, Any]] = {}
    for name, run in methods.items():
        entry: dict[str, Any] = {
            "gain_kept": gain_kept(run["matrix"], zero["matrix"]).as_dict(tasks) if zero else None
        }
        if zero and "alt_matrix" in run and "alt_matrix" in zero:
            entry["alt_gain_kept"] = gain_kept(run["alt_matrix"], zero["alt_matrix"]).as_dict(tasks)
        if has_base:
            entry["base_domain"] = {"before": before, "after": _final(run.get("probe_accuracy"))}
        out[name] = entry
    return out


def add_derived_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """Write `derived_metrics` into each method's entry of `report` (in place); returns it."""
    for name, entry in derived_metrics(report).items():
        report["methods"][name].update(entry)
    return report


def _final(values: Sequence[float] | None) -> float | None:
    return values[-1] if values else None


def _kept_mean(entry: dict[str, Any], key: str = "gain_kept") -> str:
    kept = entry.get(key)
    return "n/a" if kept is None else _fmt(kept["mean"])


def markdown(report: dict[str, Any]) -> str:
    tasks = report["tasks"]
    methods = report["methods"]
    cfg = report["config"]
    derived = derived_metrics(report)
    has_base = bool(report.get("probe_task"))
    lines = [
        f"# MoRA continual-learning evaluation: {report['suite']} suite",
        "",
        f"Model `{report['model']}`; tasks in order: {', '.join(tasks)}. "
        f"{cfg['steps']} steps per task, batch {cfg['batch_size']}, lr {cfg['lr']}, "
        f"rank {cfg['rank']}, top-k {cfg['top_k']}, tau {cfg['tau']}, "
        f"threshold {cfg['threshold']}, scale {cfg['scale']}, seed {cfg['seed']}"
        + (
            ""
            if report.get("task_logit_scale") is None
            else f", task-loss logit scale {report['task_logit_scale']:g}"
        )
        + ". "
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
        base = derived[name].get("base_domain") or {}
        rows.append(
            [f"`{name}`"]
            + [_fmt(metrics[key]) for key, _ in _METRIC_NAMES]
            + [_kept_mean(derived[name])]
            + ([_fmt(base.get("before")), _fmt(base.get("after"))] if has_base else [])
            + [_fmt(run["train_seconds"], 0), _fmt(run["eval_seconds"], 0)]
        )
    header = [
        "method",
        *(label for _, label in _METRIC_NAMES),
        "gain kept %",
        *(("base before", "base after") if has_base else ()),
        "train s",
        "eval s",
    ]
    lines += _table(header, rows)
    spaces = report.get("label_spaces") or {}
    if any("alt_metrics" in run for run in methods.values()):
        lines += ["", f"Label space: {spaces.get('matrix', 'see JSON')}.", ""]
        lines += [f"### Without the base labels ({spaces.get('alt_matrix', 'alt')})", ""]
        rows = [
            [
                f"`{name}`",
                *(_fmt(run["alt_metrics"][key]) for key, _ in _METRIC_NAMES),
                _kept_mean(derived[name], "alt_gain_kept"),
            ]
            for name, run in methods.items()
            if "alt_metrics" in run
        ]
        lines += _table(["method", *(label for _, label in _METRIC_NAMES), "gain kept %"], rows)
    lines += [
        "",
        "Transfer: mean accuracy on tasks not learned yet (upper triangle); Average: mean of "
        "the matrix; Last: mean after the final task; BWT: mean drop from just after learning "
        "a task to the end (positive = forgetting). Gain kept: per task, (accuracy at the end "
        "- zero-shot) / (accuracy just after learning it - zero-shot), zero-shot in the same "
        f"label space, mean over the tasks before the last whose learned gain is >= {MIN_GAIN:g} "
        "points (n/a otherwise, or without a zero-shot run). "
        + (
            f"Base before / after: accuracy on the pre-training domain `{report['probe_task']}` "
            "(never learned) of the frozen base and of the method after the last task, both "
            "over the last stage's label space."
            if has_base
            else "This suite has no base-domain test: base accuracy is reported for CLIP only."
        ),
        "",
        *_gain_kept_section(tasks, derived),
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


def _gain_kept_section(tasks: Sequence[str], derived: dict[str, dict[str, Any]]) -> list[str]:
    kept = {name: d["gain_kept"] for name, d in derived.items() if d.get("gain_kept")}
    if len(tasks) < 2 or not kept:
        return []
    rows = [
        [f"`{name}`", *(_fmt(k["per_task"].get(t)) for t in tasks[:-1]), _fmt(k["mean"])]
        for name, k in kept.items()
    ]
    return [
        "## Gain kept per task (%)",
        "",
        *_table(["method", *tasks[:-1], "mean"], rows),
        "",
    ]


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
    """Write the three files; adds the derived metrics to `report`'s method entries."""
    add_derived_metrics(report)
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
