"""The evaluation runner on a fake harness: who is scored when, and what the report holds."""

from __future__ import annotations

import json

import pytest

from mora_runtime.experts.stats import SequenceRouting
from mora_runtime.learn import cli as learn_cli
from mora_runtime.learn.evaluate import METHODS, run_continual
from mora_runtime.learn.metrics import continual_metrics
from mora_runtime.learn.report import write_report
from mora_runtime.learn.results import TaskResult, routing_result
from mora_runtime.learn.trainer import TrainLog


class FakeLoRA:
    def __init__(self) -> None:
        self.weights = ("init", 0)
        self.enabled = True

    def reset(self, seed: int) -> None:
        self.weights = ("init", seed)

    def state(self):
        return self.weights

    def load_state(self, state) -> None:
        self.weights = state

    def num_parameters(self) -> int:
        return 10


class FakeHarness:
    """Accuracy = a code of what produced it, so the test can read the matrix back."""

    kind = "fake"
    model_name = "fake"

    def __init__(self, tasks: int, label_space_grows: bool) -> None:
        self.task_names = [f"t{i}" for i in range(tasks)]
        self.lora = FakeLoRA()
        self.grows = label_space_grows
        self.learned: list[int] = []
        self.lora_trained: list[tuple] = []
        self.calls: list[tuple] = []

    def learn_mora(self, index: int) -> dict:
        self.learned.append(index)
        return {"task": self.task_names[index]}

    def train_lora(self, index: int) -> TrainLog:
        self.lora_trained.append((index, self.lora.weights))
        self.lora.weights = (*self.lora.weights, index)
        return TrainLog(1, 0.5, (1.0,))

    def context_key(self, stage: int, index: int):
        return stage if self.grows else None

    def evaluate(self, method: str, stage: int, index: int) -> TaskResult:
        self.calls.append((method, stage, index))
        if method == "base":
            return TaskResult(1.0)
        if method == "mora":
            return TaskResult(10.0 * (len(self.learned)) + index, purity=50.0, active_ranks=2.0)
        return TaskResult(100.0 + len(self.lora.weights) * 10 + index)

    def examples_for_report(self) -> dict:
        return {}


@pytest.mark.parametrize("grows", [False, True])
def test_runner_scores_every_method_on_every_task(grows) -> None:
    harness = FakeHarness(3, grows)
    runs = run_continual(harness, METHODS, seed=5)
    assert set(runs) == set(METHODS)
    assert harness.learned == [0, 1, 2]
    # MoRA: the pool after task i scores every task.
    assert runs["mora"].matrix == [
        [10 + j for j in range(3)],
        [20 + j for j in range(3)],
        [30 + j for j in range(3)],
    ]
    # seq-lora continues one LoRA; lora-oracle restarts per task and reuses task 0's run.
    assert harness.lora_trained == [
        (0, ("init", 5)),
        (1, ("init", 5, 0)),
        (2, ("init", 5, 0, 1)),
        (1, ("init", 6)),
        (2, ("init", 7)),
    ]
    oracle = runs["lora-oracle"].matrix
    for i in range(3):
        for j in range(3):
            assert oracle[i][j] == (130.0 + j if i >= j else 1.0)  # unlearned tasks: the base
    # The base is scored once per distinct label space, not once per method or stage.
    base_calls = [c for c in harness.calls if c[0] == "base"]
    assert len(base_calls) == (9 if grows else 3)


def test_methods_subset_and_unknown_method() -> None:
    harness = FakeHarness(2, False)
    runs = run_continual(harness, ("mora",))
    assert list(runs) == ["mora"] and harness.lora_trained == []
    with pytest.raises(ValueError, match="unknown method"):
        run_continual(harness, ("ewc",))


def test_routing_purity_pools_sequences() -> None:
    routings = [
        SequenceRouting(10, 30, {"a": 20, "b": 10}),
        SequenceRouting(10, 10, {"a": 10}),
    ]
    result = routing_result(50.0, routings, "a")
    assert result.purity == pytest.approx(75.0)
    assert result.active_ranks == pytest.approx(2.0)
    assert routing_result(50.0, routings, None).purity is None
    assert routing_result(50.0, [SequenceRouting()], "a").purity == 0.0


def test_report_files_agree_with_the_matrices(tmp_path) -> None:
    runs = run_continual(FakeHarness(3, True), METHODS)
    report = {
        "suite": "fake",
        "created_at": "now",
        "model": "fake",
        "tasks": ["t0", "t1", "t2"],
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
        "methods": {name: run.to_dict() for name, run in runs.items()},
        "environment": {"cpus": 2, "torch": "x"},
        "seconds": {"total": 1.0, "setup": 0.1},
    }
    files = write_report(report, tmp_path)
    data = json.loads((tmp_path / "eval_fake.json").read_text())
    for run in data["methods"].values():
        assert run["metrics"] == continual_metrics(run["matrix"]).as_dict()
    assert data["methods"]["mora"]["routing"]["purity"][0] == [50.0, 50.0, 50.0]
    text = (tmp_path / "eval_fake.md").read_text()
    assert "| `mora` |" in text and "MoRA routing" in text
    assert (tmp_path / "eval_fake.png").stat().st_size > 1000
    assert set(files) == {"json", "markdown", "png"}


def test_cli_parses_without_heavy_imports() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    learn_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "learn",
            "--kind",
            "lm",
            "--data",
            "d.jsonl",
            "--name",
            "n",
            "--steps",
            "3",
            "--pool",
            "a",
            "b",
            "--top-k",
            "4",
        ]
    )
    assert args.steps == 3 and args.top_k == 4 and [str(p) for p in args.pool] == ["a", "b"]
    assert learn_cli._overrides(args)["rank"] is None
    args = parser.parse_args(["eval", "--suite", "clip", "--steps", "2", "--tasks", "shapes"])
    assert args.suite == "clip" and args.tasks == "shapes"
    with pytest.raises(SystemExit):
        parser.parse_args(["learn", "--kind", "audio", "--data", "x", "--name", "n"])
