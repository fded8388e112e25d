"""Continual-learning metrics on hand-made accuracy matrices (docs/spec.md definitions)."""

from __future__ import annotations

import pytest

from mora_runtime.learn.metrics import (
    average,
    backward_transfer,
    continual_metrics,
    last,
    transfer,
)

# R[i][j]: accuracy on task j after learning tasks 0..i.
R = [
    [80.0, 10.0, 20.0],
    [70.0, 90.0, 30.0],
    [60.0, 85.0, 95.0],
]


def test_each_metric_by_hand() -> None:
    # Transfer: task 1 seen before learning it at stage 0 (10); task 2 at stages 0, 1 (20, 30).
    assert transfer(R) == pytest.approx((10 + (20 + 30) / 2) / 2)
    assert average(R) == pytest.approx(540 / 9)
    assert last(R) == pytest.approx((60 + 85 + 95) / 3)
    # BWT: drops from just after learning to the end: task 0 80 -> 60, task 1 90 -> 85.
    assert backward_transfer(R) == pytest.approx((20 + 5) / 2)


def test_no_forgetting_and_improvement_signs() -> None:
    stable = [[50.0, 0.0], [50.0, 70.0]]
    assert backward_transfer(stable) == 0
    better = [[50.0, 0.0], [60.0, 70.0]]
    assert backward_transfer(better) == pytest.approx(-10.0)  # negative: it got better


def test_single_task_has_no_transfer_or_bwt() -> None:
    metrics = continual_metrics([[42.0]])
    assert metrics.transfer is None and metrics.bwt is None
    assert metrics.average == metrics.last == 42.0
    assert continual_metrics(R).as_dict() == {
        "transfer": 17.5,
        "average": 60.0,
        "last": 80.0,
        "bwt": 12.5,
    }


@pytest.mark.parametrize(
    "matrix", [[], [[1.0, 2.0]], [[1.0], [2.0]], [[1.0, 2.0], [3.0]], [[float("nan")]]]
)
def test_malformed_matrices_are_refused(matrix) -> None:
    with pytest.raises(ValueError):
        continual_metrics(matrix)
