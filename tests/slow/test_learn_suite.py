"""End to end on the real default models, with tiny step counts: `mora eval` for both suites
and `mora learn` from exported task data. Checks shapes and invariants, never accuracies
(a few steps learn little, and timings drift on shared machines)."""

from __future__ import annotations

import json

import pytest
import torch

from mora_runtime.expert_sets.fingerprint import base_fingerprint
from mora_runtime.expert_sets.store import load_expert_set
from mora_runtime.experts.patching import find_target_modules
from mora_runtime.learn.evaluate import METHODS, SUITE_DEFAULTS, EvalOptions, run_suite
from mora_runtime.learn.export import export_task
from mora_runtime.learn.metrics import continual_metrics

pytestmark = pytest.mark.slow


def check_report(report: dict, tasks: tuple[str, ...], out_dir) -> None:
    assert report["tasks"] == list(tasks)
    assert set(report["methods"]) == set(METHODS)
    for name, run in report["methods"].items():
        matrix = run["matrix"]
        assert len(matrix) == len(tasks) and all(len(row) == len(tasks) for row in matrix)
        assert all(0.0 <= v <= 100.0 for row in matrix for v in row), name
        assert run["metrics"] == continual_metrics(matrix).as_dict()
    # The frozen base never changes; the oracle scores unlearned tasks on it.
    zero_shot = report["methods"]["zero-shot"]["matrix"]
    oracle = report["methods"]["lora-oracle"]["matrix"]
    assert oracle[0][1] == zero_shot[0][1]
    routing = report["methods"]["mora"]["routing"]
    for j in range(len(tasks)):
        assert routing["purity"][j][j] is not None and 0 <= routing["purity"][j][j] <= 100
        assert routing["active_ranks"][j][j] > 0
    assert routing["purity"][0][1] is None  # task 1 has no set yet after task 0
    stored = json.loads((out_dir / f"eval_{report['suite']}.json").read_text())
    assert stored["methods"]["mora"]["matrix"] == report["methods"]["mora"]["matrix"]
    assert (out_dir / f"eval_{report['suite']}.md").read_text().startswith("# MoRA")
    assert (out_dir / f"eval_{report['suite']}.png").stat().st_size > 1000


def test_clip_suite_end_to_end(tmp_path) -> None:
    tasks = ("shapes", "glyphs")
    options = EvalOptions(
        suite="clip",
        cfg=SUITE_DEFAULTS["clip"].with_overrides(steps=3, batch_size=16),
        tasks=tasks,
        train_size=4,
        test_size=3,
        out_dir=tmp_path,
        progress=False,
    )
    report = run_suite(options)
    check_report(report, tasks, tmp_path)
    assert len(report["methods"]["mora"]["probe_accuracy"]) == len(tasks)


def test_lm_suite_end_to_end(tmp_path) -> None:
    tasks = ("sentiment", "units")
    options = EvalOptions(
        suite="lm",
        cfg=SUITE_DEFAULTS["lm"].with_overrides(steps=2, batch_size=4),
        tasks=tasks,
        train_size=8,
        test_size=3,
        out_dir=tmp_path,
        progress=False,
    )
    report = run_suite(options)
    check_report(report, tasks, tmp_path)
    # Task 0 of seq-lora and lora-oracle are the same run: identical scores on it.
    assert (
        report["methods"]["seq-lora"]["matrix"][0][0]
        == report["methods"]["lora-oracle"]["matrix"][0][0]
    )


def test_mora_learn_cli_on_the_default_lm(tmp_path, capsys) -> None:
    from mora_runtime.models.lm import load_causal_lm
    from serving.cli import main

    data = export_task("units", tmp_path / "units", train_size=6, test_size=2)
    out = tmp_path / "store" / "units"
    argv = ["learn", "--kind", "lm", "--data", str(data["train"]), "--name", "units"]
    argv += ["--out", str(out), "--steps", "2", "--batch-size", "3", "--no-progress"]
    assert main(argv) == 0
    assert "expert set 'units' written" in capsys.readouterr().out
    model = load_causal_lm(None, device="cpu", dtype=torch.float32).model
    fingerprint = base_fingerprint(model, find_target_modules(model))
    loaded = load_expert_set(out, expected_fingerprint=fingerprint, expected_kind="causal_lm")
    assert loaded.meta.rank == 8 and loaded.meta.training["steps"] == 2

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 1, "completion": "b"}\n')
    argv = [
        "learn",
        "--kind",
        "lm",
        "--data",
        str(bad),
        "--name",
        "bad",
        "--out",
        str(tmp_path / "b"),
    ]
    assert main(argv) == 1
    assert "line 2: field 'prompt' must be a string" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
