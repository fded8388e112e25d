"""Continual-learning metrics on hand-made accuracy matrices (docs/spec.md definitions)."""

from __future__ import annotations

import pytest

from mora_runtime.learn.metrics import (
    MIN_GAIN,
    average,
    backward_transfer,
    continual_metrics,
    gain_kept,
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


# The frozen base in the same label spaces; it varies by stage (CLIP's label space grows).
Z = [
    [10.0, 5.0, 20.0],
    [10.0, 5.0, 25.0],
    [20.0, 5.0, 30.0],
]


def test_gain_kept_by_hand() -> None:
    kept = gain_kept(R, Z)
    # Task 0: learned 80 - 10 = 70 over the base, at the end 60 - 20 = 40 (the base's own
    # end-stage score, not its score at stage 0): 40 / 70.
    # Task 1: learned 90 - 5 = 85, at the end 85 - 5 = 80. The last task is not scored.
    assert kept.per_task == pytest.approx((100 * 40 / 70, 100 * 80 / 85))
    assert kept.mean == pytest.approx((100 * 40 / 70 + 100 * 80 / 85) / 2)
    assert kept.as_dict(["a", "b", "c"]) == {
        "per_task": {"a": 57.14, "b": 94.12},
        "mean": 75.63,
    }


def test_gain_kept_is_na_when_nothing_was_learned() -> None:
    small = [[80.0, 10.0, 20.0], [70.0, 5.0 + MIN_GAIN - 0.5, 30.0], [60.0, 85.0, 95.0]]
    kept = gain_kept(small, Z)
    assert kept.per_task[1] is None  # 4.5 points over the base: n/a, not 80 / 4.5
    assert kept.mean == pytest.approx(100 * 40 / 70)  # the mean skips n/a tasks
    at_threshold = [[80.0, 10.0, 20.0], [70.0, 5.0 + MIN_GAIN, 30.0], [60.0, 85.0, 95.0]]
    assert gain_kept(at_threshold, Z).per_task[1] == pytest.approx(100 * 80 / MIN_GAIN)
    worse = [[5.0, 0.0], [5.0, 50.0]]  # learning left the task under the base
    none = gain_kept(worse, [[10.0, 0.0], [10.0, 0.0]])
    assert none.per_task == (None,) and none.mean is None
    assert none.as_dict(["a", "b"]) == {"per_task": {"a": None}, "mean": None}
    assert gain_kept([[42.0]], [[1.0]]).per_task == ()


def test_gain_kept_can_exceed_100_or_go_negative() -> None:
    zero = [[0.0, 0.0], [0.0, 0.0]]
    assert gain_kept([[40.0, 0.0], [60.0, 90.0]], zero).per_task == (pytest.approx(150.0),)
    base = [[20.0, 0.0], [20.0, 0.0]]
    assert gain_kept([[40.0, 0.0], [10.0, 90.0]], base).per_task == (pytest.approx(-50.0),)


def test_gain_kept_refuses_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="same shape"):
        gain_kept(R, [[1.0]])
    with pytest.raises(ValueError, match="min_gain"):
        gain_kept(R, Z, min_gain=0.0)
