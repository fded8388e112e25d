"""The evaluation report's comparisons with the frozen base: gain kept and base-domain accuracy,
in the JSON and the Markdown, on a hand-made report."""

from __future__ import annotations

import copy
import json

import pytest

from mora_runtime.learn.metrics import continual_metrics
from mora_runtime.learn.report import derived_metrics, markdown, write_report

TASKS = ["a", "b", "c"]
ZERO = [[10.0, 5.0, 20.0], [10.0, 5.0, 25.0], [20.0, 5.0, 30.0]]
MORA = [[80.0, 10.0, 20.0], [70.0, 90.0, 30.0], [60.0, 85.0, 95.0]]
SEQ = [[50.0, 5.0, 20.0], [12.0, 8.0, 25.0], [20.0, 5.0, 90.0]]  # task b: gain 3 points only


def _run(matrix, probe=None) -> dict:
    run = {
        "matrix": matrix,
        "metrics": continual_metrics(matrix).as_dict(),
        "train_seconds": 1.0,
        "eval_seconds": 1.0,
    }
    if probe is not None:
        run["probe_accuracy"] = probe
    return run


def _report(*, probe_task: str | None = "objects", zero_shot: bool = True) -> dict:
    base = [80.0, 80.0, 79.0] if probe_task else None
    methods = {"zero-shot": _run(ZERO, base)} if zero_shot else {}
    methods["mora"] = _run(MORA, [75.0, 66.0, 47.0] if probe_task else None)
    methods["seq-lora"] = _run(SEQ, [58.0, 17.0, 1.5] if probe_task else None)
    return {
        "suite": "fake",
        "model": "fake",
        "tasks": TASKS,
        "config": {
            "steps": 1,
            "batch_size": 1,
            "lr": 1.0,
            "rank": 1,
            "top_k": 1,
            "tau": 1.0,
            "threshold": 0.0,
            "scale": 1.0,
            "seed": 0,
        },
        "trainable_parameters_per_task": {"mora": 10, "lora": 10},
        "methods": methods,
        "probe_task": probe_task,
        "environment": {"cpus": 2, "torch": "x"},
        "seconds": {"total": 1.0, "setup": 0.1},
    }


def test_gain_kept_and_base_domain_by_hand() -> None:
    derived = derived_metrics(_report())
    mora = derived["mora"]
    # a: (60 - 20) / (80 - 10); b: (85 - 5) / (90 - 5).
    assert mora["gain_kept"] == {"per_task": {"a": 57.14, "b": 94.12}, "mean": 75.63}
    # seq-lora: a (20 - 20) / (50 - 10) = 0; b learned 8 - 5 = 3 points: n/a, out of the mean.
    assert derived["seq-lora"]["gain_kept"] == {"per_task": {"a": 0.0, "b": None}, "mean": 0.0}
    assert derived["zero-shot"]["gain_kept"]["mean"] is None  # nothing learned
    # Before: the frozen base in the last stage's label space; after: the method at the end.
    assert mora["base_domain"] == {"before": 79.0, "after": 47.0}
    assert derived["seq-lora"]["base_domain"] == {"before": 79.0, "after": 1.5}


def test_without_zero_shot_or_base_domain_the_values_are_absent() -> None:
    derived = derived_metrics(_report(zero_shot=False))
    assert derived["mora"]["gain_kept"] is None
    assert derived["mora"]["base_domain"] == {"before": None, "after": 47.0}
    lm_like = derived_metrics(_report(probe_task=None))
    assert "base_domain" not in lm_like["mora"]
    assert lm_like["mora"]["gain_kept"]["mean"] == pytest.approx(75.63)


def test_json_adds_fields_and_keeps_the_old_ones(tmp_path) -> None:
    report = _report()
    original = copy.deepcopy(report)
    write_report(report, tmp_path)
    data = json.loads((tmp_path / "eval_fake.json").read_text())
    for name, run in original["methods"].items():
        stored = data["methods"][name]
        assert {k: stored[k] for k in run} == run  # every old field, unchanged
        assert set(stored) - set(run) == {"gain_kept", "base_domain"}
    assert data["methods"]["mora"]["gain_kept"]["mean"] == 75.63
    assert report["methods"]["mora"]["base_domain"] == {"before": 79.0, "after": 47.0}


def test_markdown_shows_the_new_columns() -> None:
    text = markdown(_report())
    header = next(line for line in text.splitlines() if line.startswith("| method | Transfer"))
    assert "gain kept %" in header and "base before" in header and "base after" in header
    mora_row = next(line for line in text.splitlines() if line.startswith("| `mora` |"))
    cells = [c.strip() for c in mora_row.strip("|").split("|")]
    # method, Transfer, Average, Last, BWT, gain kept, base before, base after, train s, eval s
    assert cells[5:8] == ["75.6", "79.0", "47.0"]
    assert "## Gain kept per task (%)" in text
    section = text.split("## Gain kept per task (%)")[1].split("##")[0].splitlines()
    assert "| method | a | b | mean |" in section  # the last task has nothing after it
    per_task = next(line for line in section if line.startswith("| `seq-lora` |"))
    assert per_task == "| `seq-lora` | 0.0 | n/a | 0.0 |"
    lm_text = markdown(_report(probe_task=None))
    assert "base before" not in lm_text and "no base-domain test" in lm_text
    assert "n/a" in markdown(_report(zero_shot=False)).split("## Gain kept")[0]
